"""Crashes of the real process (``python -m appliance run``, SIGKILL) in the middle of a snapshot
and in the middle of an upload: after a restart the replica equals the platform's catalog and
every sale arrives exactly once. The simulator runs in the test's loop, the box in its own
process, over TLS on loopback."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from appliance.devkit.cloud import SimHandle
from appliance.devkit.cloud_faults import Fault
from appliance.storage.catalog import ENTITY_TABLES
from tests.sync_helpers import ADMIN, StartSim, free_port, replica_digest, sim_digest, wait_until

pytest_plugins = ["tests.sync_fixtures"]

pytestmark = pytest.mark.slow


class BoxProcess:
    """``python -m appliance run --config F`` with fixed loopback ports, its log in a file."""

    def __init__(self, tmp_path: Path, sim: SimHandle, **cloud: Any) -> None:
        self.state = tmp_path / "state"
        self.admin_port, self.api_port = free_port(), free_port()
        self.log = tmp_path / "appliance.log"
        extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in cloud.items())
        self.config = tmp_path / "appliance.toml"
        self.config.write_text(f"""
[lan]
bind = "127.0.0.1"
[lan.ports]
admin = {self.admin_port}
api = {self.api_port}
events = 0
media = 0
provisioning = 0
ops = 0
support = 0
discovery = 0
[storage]
dir = "{self.state}"
[admin]
token = "{ADMIN}"
[discovery]
enabled = false
[orders]
enabled = false
[cloud]
api_url = "{sim.url}"
ca_file = "{sim.ca_path}"
pull_interval_s = 0.1
push_interval_s = 0.1
heartbeat_interval_s = 1.0
backoff_initial_s = 0.05
backoff_max_s = 0.3
{extra}""")
        self.process: trio.Process | None = None

    @property
    def db(self) -> Path:
        return self.state / "appliance.db"

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "appliance", "run", "--config", str(self.config)],
                stdout=subprocess.DEVNULL, stderr=log)

        async def healthy() -> bool:
            assert self.process is not None
            if self.process.returncode is not None:
                raise AssertionError(f"the box exited with {self.process.returncode}: {self.log.read_text()}")
            try:
                async with httpx.AsyncClient() as client:
                    return (await client.get(f"http://127.0.0.1:{self.api_port}/healthz")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_until(healthy, 30.0, "the box answering")

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()
        assert self.process.returncode == -signal.SIGKILL

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            with trio.move_on_after(10):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()

    def client(self, role: str) -> httpx.AsyncClient:
        port = self.api_port if role == "api" else self.admin_port
        return httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {ADMIN}"},
                                 timeout=10.0)

    async def pair(self, sim: SimHandle) -> None:
        async with self.client("admin") as admin:
            answer = await admin.post("/api/pairing", json={"code": sim.pair_code})
            assert answer.status_code == 200, answer.text

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """A read of the box's database from outside (what is on disk right now)."""
        if not self.db.exists():
            return []
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute(sql).fetchall()
        except sqlite3.OperationalError:  # the schema is not there yet
            return []
        finally:
            conn.close()


def _cursor(box: BoxProcess) -> Any:
    rows = box.query("SELECT cursor FROM sync_state")
    return rows[0][0] if rows else None


async def test_killed_mid_snapshot_then_restarted_equals_the_catalog(start_sim: StartSim, tmp_path: Path) -> None:
    sim = await start_sim(products=8_000)
    box = BoxProcess(tmp_path, sim)
    try:
        await box.start()
        await box.pair(sim)

        def staging() -> bool:
            rows = box.query("SELECT staged_rows, cursor FROM sync_state")
            return bool(rows) and rows[0][0] > 0 and rows[0][1] is None

        await wait_until(staging, 60.0, "the snapshot being staged")
        await box.kill()
        # Nothing half-swapped: the replica is still empty, the cursor still unset.
        assert box.query("SELECT count(*) FROM products") == [(0,)]
        assert _cursor(box) is None
        staged = sum(box.query(f"SELECT count(*) FROM {table}__next")[0][0] for table in ENTITY_TABLES.values())
        assert 0 < staged < sim.state.summary()["count"]

        await box.start()  # the pairing is on disk: it syncs by itself
        await wait_until(lambda: _cursor(box) == sim.state.cursor, 120.0, "the snapshot after the restart")
        ours = await trio.to_thread.run_sync(replica_digest, box.db)
        assert ours == await trio.to_thread.run_sync(sim_digest, sim)
        assert box.query("SELECT snapshots, staged_rows FROM sync_state") == [(1, 0)]
        # The shadows were swapped in, and the tables they replaced are dropped just after.
        await wait_until(lambda: box.query("SELECT name FROM sqlite_master WHERE name LIKE '%\\_\\_next' ESCAPE "
                                           "'\\' OR name LIKE '%\\_\\_old' ESCAPE '\\'") == [], 30.0,
                         "the replaced tables dropped")
    finally:
        await box.stop()


async def test_killed_mid_upload_then_restarted_every_sale_arrives_once(start_sim: StartSim,
                                                                         tmp_path: Path) -> None:
    sales = 300
    sim = await start_sim()
    box = BoxProcess(tmp_path, sim, push_batch=50)
    try:
        await box.start()
        # Sales made before the box is even paired: queued, durable, waiting.
        async with box.client("api") as api:
            for i in range(sales):
                sale = {"id": f"k-{i:03d}", "device_id": "pos-1", "currency": "EUR", "total_cents": i,
                        "lines": [{"sku": "SKU-000001", "qty": 1, "unit_price_cents": i}]}
                assert (await api.post("/v1/sales", json=sale)).status_code == 201
        # The platform stores the first uploads, but their answers are lost on the way back.
        sim.state.faults.add(Fault(kind="drop", path="/v1/stores/store-0001/events", count=2))
        await box.pair(sim)
        await wait_until(lambda: len(sim.state.events) > 0, 30.0, "the first upload reaching the platform")
        await box.kill()
        in_flight = box.query("SELECT DISTINCT batch_key FROM events_outbox WHERE state = 'sent'")
        assert in_flight, "the kill should catch a batch whose answer never came"

        await box.start()
        await wait_until(lambda: len(box.query("SELECT id FROM events_outbox WHERE state = 'accepted'")) == sales,
                         60.0, "every sale accepted")
        assert sorted(sim.state.events) == [f"sale-k-{i:03d}" for i in range(sales)]
        # The batch in flight at the kill went again under its own key (replayed, not re-stored).
        assert in_flight[0][0] in sim.state.idempotency_keys_seen
        assert len(sim.state.idempotency_keys_seen) == len(set(sim.state.idempotency_keys_seen))
        attempts = box.query(f"SELECT attempts FROM events_outbox WHERE batch_key = '{in_flight[0][0]}'")
        assert all(a >= 2 for (a,) in attempts)
        assert box.query("SELECT count(*) FROM events_outbox WHERE state != 'accepted'") == [(0,)]
    finally:
        await box.stop()
