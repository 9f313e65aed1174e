"""The media cache end to end: a whole appliance and the cloud simulator in the test's trio
loop, over real TLS on loopback; the box's 8002 read by httpx and by curl."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from appliance.devkit.cloud import SimHandle
from appliance.devkit.cloud_faults import Fault
from appliance.devkit.device_client import DeviceAuth
from appliance.services.media import Walked, walk_plan
from appliance.services.pairing import pair_from_web
from appliance.services.runtime import Runtime
from appliance.storage import media as media_rows
from tests.conftest import device_key
from tests.sync_helpers import ADMIN, StartBox, StartSim, api_client, fast_cloud, wait_until

pytest_plugins = ["tests.sync_fixtures", "tests.proxy"]

STORE = "store-0001"


def fast_media(**extra: Any) -> dict[str, Any]:
    return {"max_rate": 0, "concurrency": 4, "scan_interval_s": 0.1, "backoff_initial_s": 0.05,
            "backoff_max_s": 0.2, "min_free_bytes": 0, **extra}


async def media_box(start_sim: StartSim, start_box: StartBox, *, sim: dict[str, Any] | None = None,
                    media: dict[str, Any] | None = None, **sections: Any) -> tuple[SimHandle, Runtime]:
    handle = await start_sim(**(sim or {}))
    runtime = await start_box(cloud=fast_cloud(handle), media=fast_media(**(media or {})), **sections)
    await pair_from_web(runtime, handle.pair_code)
    return handle, runtime


def sim_manifest(sim: SimHandle) -> dict[str, dict[str, Any]]:
    _, records = sim.state.snapshot()
    return {r.key: r.data for r in records if r.entity == "media"}


def cached_files(runtime: Runtime) -> dict[str, str]:
    """sha256 of the bytes of every file in the box's cache, by file name."""
    blobs = Path(runtime.config.storage.dir) / "media" / "blobs"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in blobs.iterdir()}


async def all_cached(runtime: Runtime, sim: SimHandle, timeout_s: float = 30.0) -> None:
    wanted = len(sim_manifest(sim))

    def done() -> bool:
        assert runtime.media is not None
        st = runtime.media.status
        return st.files_wanted == wanted and st.files_cached == wanted

    await wait_until(done, timeout_s, f"all {wanted} media files cached")


def media_client(runtime: Runtime) -> httpx.AsyncClient:
    return api_client(runtime, "media")


async def test_catalog_cached_verified_and_served(start_sim: StartSim, start_box: StartBox) -> None:
    """A 1,000-file catalog: every file cached, each file's sha256 the simulator's, and
    served by key with the entry's type, the sha256 as ETag and the exact bytes."""
    sim, runtime = await media_box(start_sim, start_box, sim={"products": 1000})
    await all_cached(runtime, sim, 60.0)
    manifest = sim_manifest(sim)
    assert len(manifest) == 1000
    on_disk = cached_files(runtime)
    assert sorted(on_disk) == sorted(d["sha256"] for d in manifest.values())
    assert all(name == digest for name, digest in on_disk.items())
    async with media_client(runtime) as client:
        for key in ("products/SKU-000001.jpg", "products/SKU-000500.jpg", "products/SKU-001000.jpg"):
            answer = await client.get(f"/media/{key}")
            assert answer.status_code == 200
            assert hashlib.sha256(answer.content).hexdigest() == manifest[key]["sha256"]
            assert answer.headers["etag"] == f'"{manifest[key]["sha256"]}"'
            assert answer.headers["content-type"] == manifest[key]["content_type"]
            assert "max-age=" in answer.headers["cache-control"]
        missing = await client.get("/media/products/SKU-009999.jpg")
        assert missing.status_code == 404
        traversal = await client.get("/media/..%2f..%2fappliance.db")
        assert traversal.status_code == 404


async def test_an_idle_full_cache_does_not_walk_the_manifest_again(start_sim: StartSim, start_box: StartBox,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Once every file is cached, a scan whose inputs have not changed skips the walk of the
    manifest (a 100k catalog's walk is a second or two of CPU, every scan_interval_s); a
    change of the catalog is walked at the next scan."""
    walks: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Walked:
        walks.append(1)
        return walk_plan(*args, **kwargs)

    monkeypatch.setattr("appliance.services.media.walk_plan", counted)
    sim, runtime = await media_box(start_sim, start_box, sim={"products": 20})
    await all_cached(runtime, sim)
    assert runtime.media is not None
    status = runtime.media.status

    async def scans(n: int) -> None:
        for _ in range(n):
            before = status.last_scan_at
            await wait_until(lambda before=before: status.last_scan_at != before, 10.0, "another scan")  # type: ignore[misc]

    await scans(3)
    settled = len(walks)
    await scans(5)
    assert len(walks) == settled
    sim.state.put_media("products/late.jpg", b"late" * 100)
    await wait_until(lambda: hashlib.sha256(b"late" * 100).hexdigest() in blob_names(runtime), 20.0,
                     "the new file cached")
    assert len(walks) > settled


async def test_cut_download_resumes_with_range(start_sim: StartSim, start_box: StartBox) -> None:
    """A download cut half-way resumes with Range and If-Match: the simulator sends under
    1.1x the file's size in all, and the file is verified."""
    sim = await start_sim(products=0)
    content = hashlib.shake_256(b"video").digest(3_000_000)
    sim.state.put_media("promotions/spring.mp4", content)
    sim.state.faults.add(Fault(kind="cut", path=f"/blob/{STORE}/promotions/spring.mp4", after_bytes=1_200_000))
    runtime = await start_box(cloud=fast_cloud(sim), media=fast_media())
    await pair_from_web(runtime, sim.pair_code)
    await all_cached(runtime, sim)
    sent = sim.state.blob_bytes_sent["promotions/spring.mp4"]
    assert len(content) <= sent < 1.1 * len(content)
    ranges = [r for k, r in sim.state.blob_requests if k == "promotions/spring.mp4"]
    assert len(ranges) == 2 and ranges[0] == "" and ranges[1].startswith("bytes=") and ranges[1].endswith("-")
    assert 1_100_000 < int(ranges[1][len("bytes="):-1]) <= 1_200_000  # what had arrived before the cut
    assert cached_files(runtime) == {hashlib.sha256(content).hexdigest(): hashlib.sha256(content).hexdigest()}
    async with media_client(runtime) as client:  # served in several chunks, whole and in a range across chunks
        whole = await client.get("/media/promotions/spring.mp4")
        assert whole.status_code == 200 and whole.content == content
        part = await client.get("/media/promotions/spring.mp4", headers={"Range": "bytes=1048000-2097999"})
        assert part.status_code == 206 and part.content == content[1048000:2098000]


async def test_wrong_bytes_never_served_and_fetched_again(start_sim: StartSim, start_box: StartBox) -> None:
    sim = await start_sim(products=0)
    content = b"recipe card " * 5000
    sim.state.put_media("docs/recipe.pdf", content)
    sim.state.faults.add(Fault(kind="corrupt", path=f"/blob/{STORE}/docs/recipe.pdf", count=2))
    sim.state.faults.add(Fault(kind="slow", path=f"/blob/{STORE}/docs/recipe.pdf", count=2, bytes_per_s=200_000))
    runtime = await start_box(cloud=fast_cloud(sim), media=fast_media())
    await pair_from_web(runtime, sim.pair_code)
    async with media_client(runtime) as client:
        # Until the replica lists it, 404; until the verified copy is in place, 503; then
        # the true bytes: never the wrong ones, whatever arrived meanwhile.
        async def served_right() -> bool:
            answer = await client.get("/media/docs/recipe.pdf")
            if answer.status_code == 404:
                return False
            if answer.status_code == 503:
                assert answer.headers["retry-after"]
                return False
            assert answer.status_code == 200 and answer.content == content
            return True

        await wait_until(served_right, 20.0, "the recipe served")
    assert runtime.media is not None
    assert runtime.media.status.hash_failures == 2
    assert len([k for k, _ in sim.state.blob_requests if k == "docs/recipe.pdf"]) == 3


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    binary = shutil.which("curl")
    if binary is None:
        pytest.skip("curl is not installed (scripts/setup --test installs it)")
    return subprocess.run([binary, "-s", "-S", "--noproxy", "*", *args], capture_output=True, check=True, timeout=20)


async def test_curl_sees_304_206_and_416(start_sim: StartSim, start_box: StartBox, tmp_path: Path) -> None:
    sim, runtime = await media_box(start_sim, start_box, sim={"products": 3})
    await all_cached(runtime, sim)
    key = "products/SKU-000002.jpg"
    data = sim.state.blob(key)
    assert data is not None
    size, etag = len(data), f'"{hashlib.sha256(data).hexdigest()}"'
    url = f"http://127.0.0.1:{runtime.ports['media']}/media/{key}"

    def status_and_headers(*args: str) -> tuple[int, dict[str, str], bytes]:
        head = tmp_path / "head.txt"
        body = tmp_path / "body.bin"
        body.write_bytes(b"")  # curl leaves the file alone when there is no body
        result = curl("-D", str(head), "-o", str(body), "-w", "%{http_code}", *args, url)
        headers = {}
        for line in head.read_text().splitlines()[1:]:
            name, _, value = line.partition(":")
            if value:
                headers[name.strip().lower()] = value.strip()
        return int(result.stdout), headers, body.read_bytes()

    status, headers, body = await trio.to_thread.run_sync(status_and_headers)
    assert status == 200 and body == data and headers["etag"] == etag
    status, headers, body = await trio.to_thread.run_sync(status_and_headers, "-H", f"If-None-Match: {etag}")
    assert status == 304 and body == b"" and headers["etag"] == etag
    status, headers, body = await trio.to_thread.run_sync(status_and_headers, "-r", "10-99")
    assert status == 206 and body == data[10:100] and headers["content-range"] == f"bytes 10-99/{size}"
    # A range running over the end is cut at the end; one starting past it is 416.
    status, headers, body = await trio.to_thread.run_sync(status_and_headers, "-r", f"{size - 5}-{size + 100}")
    assert status == 206 and body == data[-5:] and headers["content-range"] == f"bytes {size - 5}-{size - 1}/{size}"
    status, headers, _ = await trio.to_thread.run_sync(status_and_headers, "-r", f"{size}-")
    assert status == 416 and headers["content-range"] == f"bytes */{size}"
    status, headers, body = await trio.to_thread.run_sync(status_and_headers, "-I")
    # curl -I writes the head where the body would go: nothing of the file follows it.
    assert status == 200 and headers["content-length"] == str(size)
    assert body.startswith(b"HTTP/1.1 200") and body.endswith(b"\r\n\r\n") and data[:32] not in body


async def test_wan_down_cached_still_served_uncached_503(start_sim: StartSim, start_box: StartBox) -> None:
    sim, runtime = await media_box(start_sim, start_box, sim={"products": 5})
    await all_cached(runtime, sim)
    # The WAN goes down: every blob answers 503, a new file cannot arrive.
    sim.state.faults.add(Fault(kind="status", path="/blob/", status=503, count=1_000_000))
    sim.state.put_media("promotions/new.mp4", b"x" * 10_000)

    def failing() -> bool:
        assert runtime.media is not None
        return runtime.media.status.last_error is not None

    await wait_until(failing, 10.0, "a failed download")
    async with media_client(runtime) as client:
        for i in range(1, 6):
            assert (await client.get(f"/media/products/SKU-{i:06d}.jpg")).status_code == 200
        answer = await client.get("/media/promotions/new.mp4")
        assert answer.status_code == 503 and int(answer.headers["retry-after"]) > 0
    async with api_client(runtime, "admin") as admin:
        status = (await admin.get("/api/status")).json()["media"]
        assert status["last_error"]["hop"] == "http" and status["last_error"]["status"] == 503
        page = (await admin.get("/")).text
        assert "Media" in page and "1 of 6 files not cached" in page


async def test_fetch_goes_through_the_proxy_with_tls_verified(start_sim: StartSim, start_box: StartBox,
                                                              tinyproxy: Any, tmp_path: Path) -> None:
    sim = await start_sim(products=3)
    runtime = await start_box(cloud=fast_cloud(sim), media=fast_media(), wan={"proxy": tinyproxy.url})
    await pair_from_web(runtime, sim.pair_code)
    await all_cached(runtime, sim)
    assert tinyproxy.connects().count(f"127.0.0.1:{sim.port}") >= 1
    assert any(k.startswith("products/") for k, _ in sim.state.blob_requests)


async def test_untrusted_certificate_is_a_tls_error(start_sim: StartSim, start_box: StartBox,
                                                    tinyproxy: Any, tmp_path: Path) -> None:
    """Through the proxy, a blob host whose certificate the box does not trust is never read."""
    sim = await start_sim(products=0)
    other = await start_sim(products=0, tls_dir=str(tmp_path / "other-ca"), store_id=STORE)
    # The sync API is trusted; the media URL points at a host signed by another CA.
    sim.state.upsert("media", "x.jpg", {"key": "x.jpg", "url": f"{other.url}/blob/{STORE}/x.jpg",
                                        "sha256": "0" * 64, "size": 1, "content_type": "image/jpeg"})
    runtime = await start_box(cloud=fast_cloud(sim), media=fast_media(), wan={"proxy": tinyproxy.url})
    await pair_from_web(runtime, sim.pair_code)

    def tls_failed() -> bool:
        assert runtime.media is not None
        error = runtime.media.status.last_error
        return error is not None and error.hop == "tls"

    await wait_until(tls_failed, 10.0, "a TLS failure")
    assert f"127.0.0.1:{other.port}" in tinyproxy.connects()
    assert other.state.blob_requests == type(other.state.blob_requests)()


async def test_private_entry_needs_a_credential(start_sim: StartSim, start_box: StartBox) -> None:
    """Public files for anyone on the LAN; a private one only for an adopted device's signed
    request or the admin; a stranger's or a wrong key's request is refused."""
    sim = await start_sim(products=0)
    sim.state.put_media("promotions/secret.mp4", b"unreleased" * 100)
    record = dict(sim.state.get("media", "promotions/secret.mp4") or {})
    sim.state.upsert("media", "promotions/secret.mp4", {**record, "private": True})
    sim.state.put_media("products/open.jpg", b"public" * 100)
    kiosk = {"id": "kiosk-1", "kind": "kiosk", "address": "127.0.0.1", "port": 9, "key": device_key("kiosk-1").hex()}
    runtime = await start_box(cloud=fast_cloud(sim), media=fast_media(), devices=[kiosk])
    await pair_from_web(runtime, sim.pair_code)
    await all_cached(runtime, sim)
    url = f"http://127.0.0.1:{runtime.ports.of('media')}"
    async with httpx.AsyncClient(base_url=url, trust_env=False) as anyone:
        assert (await anyone.get("/media/products/open.jpg")).status_code == 200
        refused = await anyone.get("/media/promotions/secret.mp4")
        assert refused.status_code == 401
        allowed = await anyone.get("/media/promotions/secret.mp4", headers={"Authorization": f"Bearer {ADMIN}"})
        assert allowed.status_code == 200 and allowed.headers["cache-control"].startswith("private")
    async with httpx.AsyncClient(base_url=url, trust_env=False, auth=DeviceAuth("kiosk-1", device_key("kiosk-1"))) \
            as device:
        signed = await device.get("/media/promotions/secret.mp4")
        assert signed.status_code == 200 and signed.content == b"unreleased" * 100
    async with httpx.AsyncClient(base_url=url, trust_env=False, auth=DeviceAuth("kiosk-1", b"k" * 32)) as forger:
        assert (await forger.get("/media/promotions/secret.mp4")).status_code == 401


async def test_device_access_needs_a_credential_for_every_file(start_sim: StartSim, start_box: StartBox) -> None:
    sim = await start_sim(products=1)
    runtime = await start_box(cloud=fast_cloud(sim), media=fast_media(access="device"))
    await pair_from_web(runtime, sim.pair_code)
    await all_cached(runtime, sim)
    async with media_client(runtime) as admin:  # the admin token
        assert (await admin.get("/media/products/SKU-000001.jpg")).status_code == 200
    url = f"http://127.0.0.1:{runtime.ports.of('media')}"
    async with httpx.AsyncClient(base_url=url, trust_env=False) as anyone:
        assert (await anyone.get("/media/products/SKU-000001.jpg")).status_code == 401


def blob_names(runtime: Runtime) -> set[str]:
    return {p.name for p in (Path(runtime.config.storage.dir) / "media" / "blobs").iterdir()}


async def test_disk_budget_eviction_order(start_sim: StartSim, start_box: StartBox) -> None:
    """Pinned files (an active product's image, the store config's banner) first, then the
    most recently served; the least recently served is evicted when a new pinned file comes."""
    sim = await start_sim(products=0)
    sha = {}
    for name in "abcde":
        sim.state.put_media(f"p/{name}", name.encode() * 10_000)
        sha[name] = hashlib.sha256(name.encode() * 10_000).hexdigest()
    sim.state.upsert("product", "SKU-A", {"sku": "SKU-A", "name": "A", "image": "p/a", "active": True})
    sim.state.upsert("product", "SKU-B", {"sku": "SKU-B", "name": "B", "image": "p/b", "active": False})
    store = dict(sim.state.get("store_config", "store") or {})
    sim.state.upsert("store_config", "store", {**store, "banner": "p/c"})
    runtime = await start_box(cloud=fast_cloud(sim), media=fast_media(max_bytes=40_000))
    await pair_from_web(runtime, sim.pair_code)
    assert runtime.media is not None
    status = runtime.media.status
    await wait_until(lambda: status.files_wanted == 5 and status.files_cached == 4, 20.0, "four files cached")
    # a and c pinned; b and d by key (none served yet); e does not fit.
    assert blob_names(runtime) == {sha["a"], sha["b"], sha["c"], sha["d"]}
    assert status.over_budget == 1
    checks = {c.name: c for c in await runtime.health.run_all()}
    assert checks["media.cache"].message == (
        "media: 1 of 5 files not cached: 1 over the disk budget (40 kB reached)")
    async with media_client(runtime) as client:
        assert (await client.get("/media/p/d")).status_code == 200  # d is now the most recently served

    async def d_served() -> bool:
        return (await runtime.db.read(media_rows.blobs))[sha["d"]][1] > 0

    await wait_until(d_served, 5.0, "a scan writing the serve time out")
    sim.state.put_media("p/f", b"f" * 10_000)
    sim.state.upsert("product", "SKU-F", {"sku": "SKU-F", "name": "F", "image": "p/f", "active": True})
    f_sha = hashlib.sha256(b"f" * 10_000).hexdigest()
    await wait_until(lambda: f_sha in blob_names(runtime), 20.0, "the new pinned file cached")
    await wait_until(lambda: sha["b"] not in blob_names(runtime), 5.0, "b evicted")
    assert blob_names(runtime) == {sha["a"], sha["c"], sha["d"], f_sha}
    async with media_client(runtime) as client:
        evicted = await client.get("/media/p/b")
        assert evicted.status_code == 503


async def test_free_disk_floor_is_kept(start_sim: StartSim, start_box: StartBox, tmp_path: Path) -> None:
    """With a free-disk floor above what the disk has, nothing is downloaded, and health says why."""
    sim = await start_sim(products=3)
    floor = shutil.disk_usage(tmp_path).free + 10**10
    runtime = await start_box(cloud=fast_cloud(sim), media=fast_media(min_free_bytes=floor))
    await pair_from_web(runtime, sim.pair_code)
    assert runtime.media is not None
    status = runtime.media.status
    await wait_until(lambda: status.files_wanted == 3, 20.0, "the manifest seen")
    seen_at = status.last_scan_at or 0.0
    await wait_until(lambda: (status.last_scan_at or 0.0) > seen_at, 5.0, "one more scan")
    assert status.files_cached == 0 and status.over_budget == 3 and status.budget_bytes == 0
    assert not blob_names(runtime)
    assert not sim.state.blob_requests
    checks = {c.name: c for c in await runtime.health.run_all()}
    assert "3 over the disk budget" in checks["media.cache"].message


async def test_long_fill_resumes_round_by_round_and_sees_changes(start_sim: StartSim, start_box: StartBox,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A long download is cut at each round's end and resumed with Range (no byte fetched
    twice to speak of); a file added meanwhile arrives before the long one is done."""
    monkeypatch.setattr("appliance.services.media.ROUND_MAX_S", 0.4)
    sim = await start_sim(products=0)
    big = hashlib.shake_256(b"big").digest(2_000_000)
    sim.state.put_media("promotions/big.mp4", big)
    sim.state.faults.add(Fault(kind="slow", path=f"/blob/{STORE}/promotions/big.mp4", bytes_per_s=1_000_000,
                               count=1_000))
    runtime = await start_box(cloud=fast_cloud(sim), media=fast_media())
    await pair_from_web(runtime, sim.pair_code)
    await wait_until(lambda: len(sim.state.blob_requests) >= 2, 20.0, "a second round")
    sim.state.put_media("products/late.jpg", b"late" * 100)
    small_sha = hashlib.sha256(b"late" * 100).hexdigest()
    big_sha = hashlib.sha256(big).hexdigest()
    await wait_until(lambda: small_sha in blob_names(runtime), 20.0, "the late file cached")
    assert big_sha not in blob_names(runtime)
    await all_cached(runtime, sim)
    ranges = [r for k, r in sim.state.blob_requests if k == "promotions/big.mp4"]
    # Rounds cut before the first byte (a loaded machine) ask from the start again; once a
    # byte is held, every round asks for what follows it.
    fresh = next((i for i, r in enumerate(ranges) if r), len(ranges))
    assert 1 <= fresh <= len(ranges) - 2 and all(r.startswith("bytes=") for r in ranges[fresh:]), ranges
    cuts = len(ranges) - 1
    # Each round resumes where the one before stopped (at the same place when a round was
    # cut before its first byte), never from the start: the box asks for no byte it already
    # holds. What the simulator wrote beyond that was in the sockets' buffers when a round
    # was cut (more of it when the machine is loaded and the box reads late): bounded per
    # cut, far below a round's 400 kB.
    starts = [int(r.removeprefix("bytes=").partition("-")[0]) for r in ranges[fresh:]]
    assert starts == sorted(starts) and starts[0] > 0 and starts[-1] > starts[0], ranges
    wasted = sim.state.blob_bytes_sent["promotions/big.mp4"] - len(big)
    assert wasted < 128 * 1024 * cuts, (wasted, ranges)
    assert cached_files(runtime)[big_sha] == big_sha


async def test_pass_through_streams_a_missing_file_and_caches_it(start_sim: StartSim, start_box: StartBox) -> None:
    """[media] pass_through: a file the fetcher could not get yet is streamed to the reader
    and cached; a file whose bytes are wrong is cut before its end and never cached."""
    sim = await start_sim(products=0)
    good = hashlib.shake_256(b"good").digest(300_000)
    bad = hashlib.shake_256(b"bad").digest(300_000)
    sim.state.put_media("promotions/good.mp4", good)
    sim.state.put_media("promotions/bad.mp4", bad)
    # The fetcher's first tries fail, and it then waits a long backoff: the readers come first.
    sim.state.faults.add(Fault(kind="status", path=f"/blob/{STORE}/promotions/", status=503, count=2))
    sim.state.faults.add(Fault(kind="corrupt", path=f"/blob/{STORE}/promotions/bad.mp4", count=1))
    runtime = await start_box(cloud=fast_cloud(sim), media=fast_media(pass_through=True, backoff_initial_s=60.0,
                                                                      backoff_max_s=60.0))
    await pair_from_web(runtime, sim.pair_code)
    assert runtime.media is not None
    status = runtime.media.status
    await wait_until(lambda: status.failing == 2, 20.0, "both first tries failed")
    async with media_client(runtime) as client:
        answer = await client.get("/media/promotions/good.mp4", headers={"Range": "bytes=0-"})
        assert answer.status_code == 200 and answer.content == good
        assert answer.headers["etag"] == f'"{hashlib.sha256(good).hexdigest()}"'
        assert hashlib.sha256(good).hexdigest() in blob_names(runtime)
        cached = await client.get("/media/promotions/good.mp4", headers={"Range": "bytes=0-9"})
        assert cached.status_code == 206 and cached.content == good[:10]
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get("/media/promotions/bad.mp4")
    assert hashlib.sha256(bad).hexdigest() not in blob_names(runtime)
    async with media_client(runtime) as client:
        again = await client.get("/media/promotions/bad.mp4")  # the fault is used up: the true bytes
        assert again.status_code == 200 and again.content == bad


async def test_changed_entry_keeps_its_file_until_the_new_one_is_verified(start_sim: StartSim,
                                                                          start_box: StartBox) -> None:
    sim = await start_sim(products=0)
    old, new = b"old menu " * 20_000, b"new menu " * 20_000
    sim.state.put_media("docs/menu.pdf", old)
    runtime = await start_box(cloud=fast_cloud(sim), media=fast_media())
    await pair_from_web(runtime, sim.pair_code)
    await all_cached(runtime, sim)
    old_sha, new_sha = hashlib.sha256(old).hexdigest(), hashlib.sha256(new).hexdigest()
    # The new version arrives slowly and wrong first: the old one is served all along.
    sim.state.faults.add(Fault(kind="slow", path=f"/blob/{STORE}/docs/menu.pdf", bytes_per_s=400_000, count=2))
    sim.state.faults.add(Fault(kind="corrupt", path=f"/blob/{STORE}/docs/menu.pdf", count=1))
    sim.state.put_media("docs/menu.pdf", new)
    async with media_client(runtime) as client:
        async def switched() -> bool:
            answer = await client.get("/media/docs/menu.pdf")
            assert answer.status_code == 200
            if answer.headers["etag"] == f'"{old_sha}"':
                assert answer.content == old
                return False
            assert answer.headers["etag"] == f'"{new_sha}"' and answer.content == new
            return True

        await wait_until(switched, 20.0, "the new version served")
        assert runtime.media is not None and runtime.media.status.hash_failures == 1
        await wait_until(lambda: old_sha not in blob_names(runtime), 5.0, "the old version evicted")
        # A deleted entry is no longer served, and its file goes.
        sim.state.delete("media", "docs/menu.pdf")

        async def gone() -> bool:
            return (await client.get("/media/docs/menu.pdf")).status_code == 404

        await wait_until(gone, 10.0, "the deleted entry gone")
        await wait_until(lambda: new_sha not in blob_names(runtime), 5.0, "its file deleted")
