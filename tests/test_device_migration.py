"""Upgrading a box that adopted devices before enrollment existed, and [[devices]] keys."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import httpx
import trio

from appliance.devkit.device import DeviceSimulator, run_device_simulator
from appliance.storage.devices import get_device
from appliance.storage.schema import load_migrations, migrate

from .conftest import ConfigFactory, device_key, running_box

ROOT = Path(__file__).resolve().parent.parent
ADMIN = {"Authorization": "Bearer test-admin-token-0123456789"}
IDENTITY = next(m.version for m in load_migrations() if m.name == "identity")


def old_box(state: Path, port: int) -> None:
    """A database as the firmware before enrollment left it: kds-1 adopted, pos-1 pending."""
    state.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(state / "appliance.db")
    migrate(conn, tuple(m for m in load_migrations() if m.version < IDENTITY))
    now = time.time()
    conn.executemany("INSERT INTO devices VALUES (?, ?, ?, '127.0.0.1', ?, ?, 'discovery', ?, ?, ?)",
                     [("kds-1", "kds", "Kitchen", port, "adopted", now, now, now),
                      ("pos-1", "pos", "Till", 9, "pending", now, now, now)])
    conn.commit()
    conn.close()


async def test_an_upgraded_box_keeps_pushing_to_its_adopted_devices_until_they_enroll(
        make_config: ConfigFactory, tmp_path: Path) -> None:
    legacy = DeviceSimulator(device_id="kds-1", kind="kds")  # an old app: no key, no proofs
    async with trio.open_nursery() as sims:
        port = await sims.start(partial(run_device_simulator, legacy, port=0, bind="127.0.0.1"))
        old_box(tmp_path / "state", port)
        async with running_box(make_config()) as rt, httpx.AsyncClient() as client:
            kds = await rt.db.read(partial(get_device, device_id="kds-1"))
            pos = await rt.db.read(partial(get_device, device_id="pos-1"))
            assert kds is not None and kds.legacy and pos is not None and not pos.legacy
            api, admin = f"http://127.0.0.1:{rt.ports['api']}", f"http://127.0.0.1:{rt.ports['admin']}"
            answer = await client.post(f"{api}/v1/devices/kds-1/commands", headers=ADMIN,
                                       json={"kind": "ping", "body": {"n": 1}})
            assert answer.status_code == 201
            with trio.fail_after(10):
                while not legacy.accepted:  # noqa: ASYNC110  # the simulator's memory: nothing to wait on
                    await trio.sleep(0.02)
            health = {c["name"]: c for c in (await client.post(f"http://127.0.0.1:{rt.ports['ops']}/health",
                                                                  headers=ADMIN))
                      .json()["checks"]}
            check = health["device.kds-1.key"]
            assert check["status"] == "warn" and "adopted before enrollment" in check["message"]
            listed = (await client.get(f"{admin}/api/devices/kds-1")).json()["device"]
            assert listed["gets_commands"] is True and "until it enrolls" in listed["key"]
            page = (await client.get(f"{admin}/")).text
            assert "value='end-legacy:kds-1'" in page

            # The admin closes the window: no more commands until it enrolls.
            assert (await client.post(f"{admin}/api/devices/kds-1/end-legacy", headers=ADMIN)).status_code == 200
            listed = (await client.get(f"{admin}/api/devices/kds-1")).json()["device"]
            assert listed["gets_commands"] is False and listed["legacy"] is False
            with trio.fail_after(10):
                while (await client.get(f"{admin}/api/status")).json()["device_links"]:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            health = {c["name"]: c for c in (await client.post(f"http://127.0.0.1:{rt.ports['ops']}/health",
                                                                  headers=ADMIN))
                      .json()["checks"]}
            assert health["device.kds-1.key"]["message"] == "device kds-1: adopted but has no key: it gets no commands"
        sims.cancel_scope.cancel()


async def test_a_declared_device_without_a_key_is_listed_and_gets_nothing(make_config: ConfigFactory) -> None:
    sim = DeviceSimulator(device_id="printer-1", kind="printer")
    async with trio.open_nursery() as sims:
        port = await sims.start(partial(run_device_simulator, sim, port=0, bind="127.0.0.1"))
        devices = [{"id": "printer-1", "kind": "printer", "address": "127.0.0.1", "port": port},
                   {"id": "kds-2", "kind": "kds", "address": "127.0.0.1", "port": 9, "key": device_key("kds-2").hex()}]
        async with running_box(make_config(devices=devices)) as rt, httpx.AsyncClient() as client:
            admin = f"http://127.0.0.1:{rt.ports['admin']}"
            listed = {d["id"]: d for d in (await client.get(f"{admin}/api/devices")).json()["devices"]}
            assert listed["printer-1"]["gets_commands"] is False and "set key" in listed["printer-1"]["key"]
            assert listed["kds-2"]["gets_commands"] is True and listed["kds-2"]["key"] == "pre-shared key (config)"
            assert "set key in its [[devices]] entry" in (await client.get(f"{admin}/")).text
            health = {c["name"]: c for c in (await client.post(f"http://127.0.0.1:{rt.ports['ops']}/health",
                                                                  headers=ADMIN))
                      .json()["checks"]}
            assert "appliance device-key" in health["device.printer-1.key"]["fix"]
            assert "device.kds-2.key" not in health
            status = (await client.get(f"{admin}/api/status")).json()
            assert [link["device_id"] for link in status["device_links"]] == ["kds-2"]
            assert sim.connections == 0
        sims.cancel_scope.cancel()


def test_device_key_prints_a_fresh_key_for_the_config() -> None:
    runs = [subprocess.run([sys.executable, "-m", "appliance", "device-key", "till-4"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout for _ in range(2)]
    keys = [next(line.split('"')[1] for line in out.splitlines() if line.startswith("key = ")) for out in runs]
    assert keys[0] != keys[1] and all(len(k) == 64 and int(k, 16) >= 0 for k in keys)
    assert 'id = "till-4"' in runs[0] and "shown once" in runs[0]
