"""Crashes of the real process (``python -m appliance run``, SIGKILL) in the middle of a snapshot
and in the middle of an upload: after a restart the replica equals the platform's catalog and
every sale arrives exactly once. The simulator runs in the test's loop, the box in its own
process, over TLS on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from appliance.devkit.cloud import SimHandle
from appliance.devkit.cloud_faults import Fault
from appliance.storage.catalog import ENTITY_TABLES
from tests.realbox import BoxProcess
from tests.sync_helpers import StartSim, replica_digest, sim_digest, wait_until

pytest_plugins = ["tests.sync_fixtures"]

pytestmark = pytest.mark.slow


# The upload loop runs often, so the crash lands in the middle of it.
SYNC = {"push_interval_s": 0.1, "heartbeat_interval_s": 1.0}


async def pair(box: BoxProcess, sim: SimHandle) -> None:
    async with box.client("admin") as admin:
        answer = await admin.post("/api/pairing", json={"code": sim.pair_code})
        assert answer.status_code == 200, answer.text


def _cursor(box: BoxProcess) -> Any:
    rows = box.query("SELECT cursor FROM sync_state")
    return rows[0][0] if rows else None


async def test_killed_mid_snapshot_then_restarted_equals_the_catalog(start_sim: StartSim, tmp_path: Path) -> None:
    sim = await start_sim(products=8_000)
    box = BoxProcess(tmp_path, sim, cloud=SYNC)
    try:
        await box.start()
        await pair(box, sim)

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
    box = BoxProcess(tmp_path, sim, cloud={**SYNC, "push_batch": 50})
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
        await pair(box, sim)
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
