"""Port 8005: the diagnostics bundle (opened with the real `tar`, every part there, no
planted secret in it, the database writer never held up) and the live log tail (a record
logged after the connection opened arrives within 1 s); `appliance bundle` with the
service stopped; the homepage's links."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from appliance.services.bundle import PARTS
from appliance.services.pairing import pair_from_web
from appliance.services.runtime import Runtime
from tests.sync_helpers import ADMIN, StartBox, StartSim, api_client, fast_cloud, wait_until

pytest_plugins = ["tests.sync_fixtures"]

log = logging.getLogger("appliance.test.support")
SAS = "config-support-sas-key-xyz"
PROXY_PASSWORD = "bundle-proxy-pass"


def members(data: bytes, tmp_path: Path) -> dict[str, bytes]:
    """The archive's files, read by the system's tar (what a technician would use)."""
    archive = tmp_path / "bundle.tar.gz"
    archive.write_bytes(data)
    listing = subprocess.run(["tar", "-tzf", str(archive)], capture_output=True, text=True, check=True).stdout
    out = tmp_path / "x"
    out.mkdir(exist_ok=True)
    subprocess.run(["tar", "-xzf", str(archive), "-C", str(out)], check=True)
    return {name.removeprefix("appliance-bundle/"): (out / name).read_bytes() for name in listing.split()}


def support_client(runtime: Runtime) -> httpx.AsyncClient:
    return api_client(runtime, "support")


async def test_the_bundle_holds_every_part_and_no_secret(start_sim: StartSim, start_box: StartBox,
                                                         tmp_path: Path) -> None:
    sim = await start_sim()
    runtime = await start_box(cloud=fast_cloud(sim), support={"sas_key": SAS},
                              wan={"proxy": f"http://tech:{PROXY_PASSWORD}@127.0.0.1:3128",
                                   "no_proxy": ["127.0.0.1"]})
    await pair_from_web(runtime, sim.pair_code)
    assert runtime.store is not None
    secrets = [ADMIN, runtime.store.token, runtime.store.store_secret, SAS, PROXY_PASSWORD,
               str(runtime.store.services["logs"]["api_key"]), str(runtime.store.services["orders"]["sas_key"])]
    for secret in secrets:
        log.warning("a planted secret: %s", secret)
    log.warning("the last record before the bundle")

    async with support_client(runtime) as client:
        assert (await client.get("/v1/bundle", headers={"Authorization": "Bearer wrong"})).status_code == 401
        # Meanwhile a writer keeps committing: the bundle must never hold it up.
        waits: list[float] = []

        async def writer() -> None:
            while True:
                started = time.perf_counter()
                await runtime.db.write(lambda conn: conn.execute("SELECT 1"))
                waits.append(time.perf_counter() - started)
                await trio.sleep(0.005)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            answer = await client.get("/v1/bundle?logs=1000")
            nursery.cancel_scope.cancel()
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/gzip"
    assert "attachment" in answer.headers["content-disposition"]
    files = members(answer.content, tmp_path)
    assert set(files) == {"manifest.json", *PARTS}
    manifest = json.loads(files["manifest.json"])
    assert {name: part["status"] for name, part in manifest["parts"].items()} == dict.fromkeys(PARTS, "ok")
    for name, content in files.items():
        for secret in secrets:
            assert secret.encode() not in content, f"a secret in {name}"
    assert b"the last record before the bundle" in files["logs.ndjson"]
    assert all(json.loads(line) for line in files["logs.ndjson"].splitlines())
    database = json.loads(files["database.json"])
    assert database["integrity_check"] == ["ok"] and database["rows"]["products"] == 20
    assert json.loads(files["live.json"])["running"] is True
    assert {c["name"] for c in json.loads(files["health.json"])["checks"]} >= {"logs.ring", "logs.shipping"}
    assert json.loads(files["config.json"])["config"]["admin"]["token"] == "***"
    assert "pull" in json.loads(files["live.json"])["sync"]
    assert "table inet appliance" in files["firewall-rendered.nft"].decode()
    assert waits and max(waits) < 0.25, f"a write waited {max(waits):.3f} s during the bundle"


async def test_the_tail_streams_a_new_record_within_a_second(appliance: Runtime) -> None:
    log.setLevel(logging.DEBUG)
    log.warning("before the tail opened")
    async with support_client(appliance) as client:
        assert (await client.get("/v1/logs/tail", headers={"Authorization": ""})).status_code == 401
        assert (await client.get("/v1/logs/tail?level=loud")).status_code == 400
    # A bare HTTP/1.1 client on a socket: what arrives, when it arrives, nothing buffered.
    stream = await trio.open_tcp_stream("127.0.0.1", appliance.ports["support"])
    async with stream:
        host = f"127.0.0.1:{appliance.ports['support']}".encode()
        await stream.send_all(b"GET /v1/logs/tail?level=info&logger=appliance.test&backlog=5 HTTP/1.1\r\n"
                              b"Host: " + host + b"\r\nAuthorization: Bearer " + ADMIN.encode() + b"\r\n\r\n")
        received = everything = b""

        async def next_record() -> dict[str, Any]:
            nonlocal received, everything
            while True:
                _head, sep, rest = received.partition(b"\ndata: ")
                if sep and b"\n" in rest:
                    line, _, received = rest.partition(b"\n")
                    return dict(json.loads(line))
                chunk = await stream.receive_some(65536)
                assert chunk, "the stream ended"
                received += chunk
                everything += chunk

        first = await next_record()
        assert b"content-type: text/event-stream" in everything.lower()
        assert first["msg"] == "before the tail opened", "the backlog comes first"
        log.debug("filtered out: below the level asked")
        logging.getLogger("appliance.other").warning("filtered out: another logger")
        sent = time.monotonic()
        log.warning("logged after the connection opened")
        with trio.fail_after(1.0):
            record = await next_record()
        assert record["msg"] == "logged after the connection opened"
        assert time.monotonic() - sent < 1.0


async def test_the_homepage_links_the_bundle_and_the_tail(appliance: Runtime) -> None:
    async with api_client(appliance, "admin") as admin:
        home = (await admin.get("/")).text
        assert "Download the diagnostics bundle" in home and "Watch the live log" in home
        moved = await admin.post("/support/bundle", data={"token": ADMIN})
        assert moved.status_code == 307
        assert moved.headers["location"] == f"http://127.0.0.1:{appliance.ports['support']}/v1/bundle"
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        bundle = await client.post(moved.headers["location"], data={"token": ADMIN})
        assert bundle.status_code == 200
        with tarfile.open(fileobj=io.BytesIO(bundle.content)) as tar:
            assert "appliance-bundle/manifest.json" in tar.getnames()
        refused = await client.post(moved.headers["location"], data={"token": "nope"})
        assert refused.status_code == 401


async def test_appliance_bundle_works_with_the_service_stopped(start_box: StartBox, tmp_path: Path) -> None:
    config_file = tmp_path / "appliance.toml"
    state = tmp_path / "state"
    config_file.write_text(f'[storage]\ndir = "{state}"\n[lan]\nbind = "127.0.0.1"\n'
                           f'[lan.ports]\nops = 1\n[support]\nsas_key = "{SAS}"\n')
    runtime = await start_box()
    log.warning("written while it ran: %s", SAS)
    assert runtime.log_ring is not None
    await trio.to_thread.run_sync(runtime.log_ring.flush)
    runtime.stopping.set()
    await wait_until(lambda: runtime.log_ring is None, 10.0, "the box stopped and its ring closed")
    out = tmp_path / "b.tar.gz"
    done = await trio.run_process([sys.executable, "-m", "appliance", "bundle", "--config", str(config_file),
                                   "--out", str(out)], capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert b"wrote" in done.stdout
    files = members(out.read_bytes(), tmp_path)
    assert set(files) == {"manifest.json", *PARTS}
    assert b"written while it ran" in files["logs.ndjson"] and SAS.encode() not in files["logs.ndjson"]
    assert json.loads(files["live.json"])["running"] is False
    checks = json.loads(files["health.json"])["checks"]
    assert checks[0]["name"] == "appliance.process" and checks[0]["status"] == "fail"
    assert oct(out.stat().st_mode & 0o777) == "0o600"
