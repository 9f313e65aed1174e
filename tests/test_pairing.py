"""Pairing against the cloud simulator: ``appliance pair`` (a real process), the homepage form,
the JSON route, the pairing file, and a running box picking up a pairing made beside it."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import trio

from appliance.devkit.cloud import SimHandle
from appliance.services.runtime import Runtime
from appliance.storage.catalog import sync_state
from appliance.storage.pairing import PAIRING_FILE, load_pairing
from appliance.storage.secrets import write_secret
from tests.sync_helpers import ADMIN, StartBox, StartSim, api_client, fast_cloud, free_port, wait_until

pytest_plugins = ["tests.sync_fixtures"]


def cli_config(tmp_path: Path, sim: SimHandle | None, state_dir: Path, api_url: str = "") -> Path:
    path = tmp_path / "cli.toml"
    url = api_url or (sim.url if sim else "")
    ca = f'ca_file = "{sim.ca_path}"' if sim else ""
    path.write_text(f'[storage]\ndir = "{state_dir}"\n[cloud]\napi_url = "{url}"\n{ca}\n'
                    "connect_timeout_s = 2.0\nread_timeout_s = 5.0\n")
    return path


async def appliance_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    with trio.fail_after(60):
        return await trio.run_process([sys.executable, "-m", "appliance", *args], capture_stdout=True,
                                      capture_stderr=True, check=False, env=env)


async def test_appliance_pair_saves_a_private_pairing(start_sim: StartSim, tmp_path: Path) -> None:
    sim = await start_sim()
    state = tmp_path / "state"
    # The environment's proxy (a dead port) is ignored: the box's config decides the path.
    done = await appliance_cli("pair", sim.pair_code, "--config", str(cli_config(tmp_path, sim, state)))
    assert done.returncode == 0, done.stderr.decode()
    assert b"with store store-0001" in done.stdout
    assert stat.S_IMODE(os.stat(state / PAIRING_FILE).st_mode) == 0o600
    link = load_pairing(state)
    assert link is not None and link.store_id == "store-0001" and link.store_secret == sim.state.store_secret
    assert link.service("orders") is not None and link.service("orders")["queue"] == "store-0001-orders"  # type: ignore[index]
    # The token works: the platform knows it.
    async with httpx.AsyncClient(base_url=sim.url, verify=sim.ssl_context()) as client:
        answer = await client.get(f"/v1/stores/{link.store_id}/changes", params={"cursor": "0", "limit": "1"},
                                  headers={"Authorization": f"Bearer {link.token}"})
        assert answer.status_code == 200


async def test_appliance_pair_explains_failures(start_sim: StartSim, tmp_path: Path) -> None:
    sim = await start_sim()
    state = tmp_path / "state"
    wrong = await appliance_cli("pair", "PAIR-9999", "--config", str(cli_config(tmp_path, sim, state)))
    assert wrong.returncode == 2
    assert b"no store has this pairing code" in wrong.stderr
    closed = free_port()
    down = await appliance_cli("pair", "PAIR-0001", "--config",
                               str(cli_config(tmp_path, sim, state, f"https://127.0.0.1:{closed}")))
    assert down.returncode == 1
    assert f"cannot connect to 127.0.0.1:{closed}: connection refused".encode() in down.stderr
    untrusted = tmp_path / "untrusted.toml"
    untrusted.write_text(f'[storage]\ndir = "{state}"\n[cloud]\napi_url = "{sim.url}"\n')
    tls = await appliance_cli("pair", "PAIR-0001", "--config", str(untrusted))
    assert tls.returncode == 1 and b"certificate is not trusted" in tls.stderr
    assert not (state / PAIRING_FILE).exists()  # nothing half-done


async def test_a_running_box_picks_up_a_pairing_made_beside_it(start_sim: StartSim, start_box: StartBox,
                                                              tmp_path: Path) -> None:
    sim = await start_sim()
    runtime = await start_box(cloud=fast_cloud(sim))
    assert runtime.store is None
    seen = runtime.pairing_changes.version
    done = await appliance_cli("pair", sim.pair_code, "--config",
                               str(cli_config(tmp_path, sim, Path(runtime.config.storage.dir))))
    assert done.returncode == 0, done.stderr.decode()
    with trio.fail_after(10):
        await runtime.pairing_changes.wait(seen)
    assert runtime.store is not None and runtime.store.store_id == "store-0001"

    async def synced() -> bool:
        return (await runtime.db.read(sync_state)).cursor == sim.state.cursor

    await wait_until(synced, 20.0, "the first sync after pairing")
    # The CLI paired under the box's own id.
    assert any(t.appliance_id == runtime.appliance_id for t in sim.state._tokens.values())


async def homepage(runtime: Runtime) -> str:
    async with api_client(runtime, "admin") as admin:
        return (await admin.get("/")).text


async def form(runtime: Runtime, **fields: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{runtime.ports['admin']}") as admin:
        return await admin.post("/pairing", data=fields)


def cloud_card(page: str) -> str:
    start = page.index("<section id=cloud>")
    return page[start:page.index("</section>", start)]


async def test_the_homepage_form_pairs_the_box(start_sim: StartSim, start_box: StartBox) -> None:
    sim = await start_sim()
    runtime = await start_box(cloud=fast_cloud(sim))
    page = await homepage(runtime)
    assert "not paired" in page and "action='/pairing'" in page
    assert page.count("<script") == page.count("<section id=live")  # the form needs no script
    checks = {c.name: c for c in await runtime.health.run_all()}
    assert checks["cloud.pairing"].status == "warn" and "pair" in checks["cloud.pairing"].fix
    # Never paired: the code alone pairs it (the back office's code is the proof); no token field.
    assert "name=token" not in cloud_card(page)
    wrong_code = await form(runtime, code="PAIR-0002")
    assert wrong_code.status_code == 400 and "no store has this pairing code" in wrong_code.text
    empty = await form(runtime, code="  ")
    assert empty.status_code == 400
    assert runtime.store is None
    async with api_client(runtime, "admin") as admin:
        assert (await admin.post("/pairing", json={"code": "x"})).status_code == 415
    done = await form(runtime, code=sim.pair_code)
    assert done.status_code == 303 and done.headers["location"] == "/#cloud"
    assert runtime.store is not None and runtime.store.store_id == "store-0001"
    page = await homepage(runtime)
    assert "paired with store store-0001" in page and "name=token" in cloud_card(page)
    # Paired: pairing again needs the admin token (pinned by this test's configuration).
    wrong_token = await form(runtime, code=sim.pair_code, token="guess")
    assert wrong_token.status_code == 401 and "admin token" in wrong_token.text
    first_token = runtime.store.token
    again = await form(runtime, code=sim.pair_code, token=ADMIN)
    assert again.status_code == 303 and runtime.store.token != first_token
    async with api_client(runtime, "admin") as admin:
        status: dict[str, Any] = (await admin.get("/api/status")).json()["cloud"]["pairing"]
    assert status["state"] == "paired" and status["services"] == ["logs", "media", "orders", "support"]
    assert "token" not in json.dumps(status)


async def test_the_json_route_pairs_the_box(start_sim: StartSim, start_box: StartBox) -> None:
    sim = await start_sim()
    runtime = await start_box(cloud=fast_cloud(sim))
    async with api_client(runtime, "admin") as admin:
        answer = await admin.post("/api/pairing", json={"code": sim.pair_code})
        assert answer.status_code == 200 and answer.json()["pairing"]["store_id"] == "store-0001"
        again = await admin.post("/api/pairing", json={"code": "PAIR-0404"})
        assert again.status_code == 400 and "pairing code" in again.json()["error"]
    assert runtime.store is not None and runtime.store.store_id == "store-0001"  # the earlier pairing stays


async def test_a_damaged_pairing_file_is_shown_not_fatal(start_box: StartBox, make_config: Any) -> None:
    state = Path(make_config().storage.dir)
    write_secret(state / PAIRING_FILE, "{not json")
    runtime = await start_box()
    assert runtime.store is None
    checks = {c.name: c for c in await runtime.health.run_all()}
    assert checks["cloud.pairing"].status == "fail"
    assert "pairing.json is not valid JSON" in checks["cloud.pairing"].message
    assert "pair the box again" in await homepage(runtime)


async def test_pairing_with_another_store_holds_the_old_stores_events(start_sim: StartSim, tmp_path: Path) -> None:
    """A box moved to another shop must not report the old shop's sales in the new one's books."""
    from appliance.storage import DATABASE_FILE, Database
    from appliance.storage.events import enqueue, outbox_stats, recent_rejected

    first = await start_sim()
    second = await start_sim(store_id="store-0002", pair_code="PAIR-0002", tls_dir=str(tmp_path / "tls2"))
    state = tmp_path / "state"
    paired = await appliance_cli("pair", first.pair_code, "--config", str(cli_config(tmp_path, first, state)))
    assert paired.returncode == 0, paired.stderr.decode()
    db = await Database.open(state / DATABASE_FILE)
    try:
        await db.write(lambda c: enqueue(c, id="sale:a1", kind="sale", body='{"id":"sale:a1"}', now=1.0))
        # Pairing again with the same store keeps what waits.
        again = await appliance_cli("pair", first.pair_code, "--config", str(cli_config(tmp_path, first, state)))
        assert again.returncode == 0, again.stderr.decode()
        assert (await db.read(outbox_stats)).queued == 1
        moved = await appliance_cli("pair", second.pair_code, "--config", str(cli_config(tmp_path, second, state)))
        assert moved.returncode == 0, moved.stderr.decode()
        stats = await db.read(outbox_stats)
        assert stats.queued == 0 and stats.rejected == 1
        [held] = await db.read(lambda c: recent_rejected(c, 10))
        assert held["id"] == "sale:a1"
        assert "recorded for store store-0001" in str(held["reason"]) and "store-0002" in str(held["reason"])
    finally:
        db.close()
    assert b"1 event(s) recorded for store store-0001 are held" in moved.stderr
