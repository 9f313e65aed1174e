"""Cloud sync end to end: a whole appliance and the cloud simulator in the test's trio loop,
over real TLS on loopback (the simulator's trustme CA is the box's [cloud] ca_file)."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from appliance.devkit.cloud import SimHandle
from appliance.devkit.cloud_faults import Fault
from appliance.services.pairing import pair_from_web
from appliance.services.runtime import Runtime
from appliance.storage.catalog import sync_state
from appliance.storage.events import outbox_stats
from appliance.storage.pairing import load_pairing
from tests.sync_helpers import (
    ADMIN,
    StartBox,
    StartSim,
    api_client,
    fast_cloud,
    replica_digest,
    sim_digest,
    wait_until,
)

pytest_plugins = ["tests.sync_fixtures"]

STORE = "store-0001"


def sale(sale_id: str, total: int = 698) -> dict[str, Any]:
    return {"id": sale_id, "device_id": "pos-1", "currency": "EUR", "total_cents": total,
            "lines": [{"sku": "SKU-000001", "qty": 2, "unit_price_cents": 349}],
            "payments": [{"method": "card", "amount_cents": total}]}


async def paired(start_sim: StartSim, start_box: StartBox, *, sim: dict[str, Any] | None = None,
                 **cloud: Any) -> tuple[SimHandle, Runtime]:
    handle = await start_sim(**(sim or {}))
    runtime = await start_box(cloud=fast_cloud(handle, **cloud))
    await pair_from_web(runtime, handle.pair_code)
    return handle, runtime


async def caught_up(runtime: Runtime, sim: SimHandle, timeout_s: float = 20.0) -> None:
    async def current() -> bool:
        state = await runtime.db.read(sync_state)
        return state.cursor == sim.state.cursor

    await wait_until(current, timeout_s, f"the replica reaching cursor {sim.state.cursor}")


async def drained(runtime: Runtime, timeout_s: float = 20.0) -> None:
    async def empty() -> bool:
        return (await runtime.db.read(outbox_stats)).queued == 0

    await wait_until(empty, timeout_s, "the events outbox draining")


async def same_catalog(runtime: Runtime, sim: SimHandle) -> None:
    ours = await trio.to_thread.run_sync(replica_digest, runtime.db.path)
    theirs = await trio.to_thread.run_sync(sim_digest, sim)
    assert ours == theirs


@pytest.mark.slow
async def test_full_snapshot_of_ten_thousand_products(start_sim: StartSim, start_box: StartBox) -> None:
    sim, runtime = await paired(start_sim, start_box, sim={"products": 10_000})
    await caught_up(runtime, sim, 60.0)
    await same_catalog(runtime, sim)
    state = await runtime.db.read(sync_state)
    assert state.snapshots == 1
    async with api_client(runtime) as api:
        product = (await api.get("/v1/products/SKU-010000")).json()
        assert product == sim.state.get("product", "SKU-010000")
        price = await api.get("/v1/prices/SKU-000042")
        assert price.status_code == 200 and price.json() == sim.state.get("price", "SKU-000042")
        page = (await api.get("/v1/products", params={"prefix": "", "limit": 200})).json()
        assert len(page["items"]) == 200 and page["next"]
    # The heartbeat carried the health summary and the queues.
    await wait_until(lambda: len(sim.state.heartbeats) > 0, 10.0, "a heartbeat")
    beat = sim.state.heartbeats[-1]["body"]
    assert beat["queues"]["events_pending"] == 0 and beat["health"]["status"] in ("ok", "warn", "fail")
    assert beat["appliance_id"] == runtime.appliance_id


async def test_deltas_upsert_and_delete(start_sim: StartSim, start_box: StartBox) -> None:
    sim, runtime = await paired(start_sim, start_box)
    await caught_up(runtime, sim)
    renamed = {**(sim.state.get("product", "SKU-000003") or {}), "name": "Zesty Lemon Tart"}
    sim.state.mutate([
        ("product", "SKU-000003", renamed),
        ("price", "SKU-000003", {"sku": "SKU-000003", "amount_cents": 999, "currency": "EUR"}),
        ("product", "SKU-NEW", {"sku": "SKU-NEW", "name": "Zesty New", "category": "x", "tax_rate_bp": 550,
                                "barcode": "2000000000000", "image": None, "active": True, "extra": [1]}),
        ("stock", "SKU-000004", None),
        ("product", "SKU-000005", None),
    ])
    await caught_up(runtime, sim)
    await same_catalog(runtime, sim)
    async with api_client(runtime) as api:
        assert (await api.get("/v1/prices/SKU-000003")).json()["amount_cents"] == 999
        assert (await api.get("/v1/stock/SKU-000004")).status_code == 404
        assert (await api.get("/v1/products/SKU-000005")).status_code == 404
        zesty = (await api.get("/v1/products", params={"prefix": "zEsTy"})).json()["items"]
        assert [p["sku"] for p in zesty] == ["SKU-000003", "SKU-NEW"]  # by name: "zesty lemon" < "zesty new"
        assert zesty[1]["extra"] == [1]  # fields the box does not know are kept
    state = await runtime.db.read(sync_state)
    assert state.snapshots == 1  # deltas, not a new snapshot


async def test_an_expired_cursor_reads_the_snapshot_again(start_sim: StartSim, start_box: StartBox) -> None:
    sim, runtime = await paired(start_sim, start_box, sim={"retention": 5})
    await caught_up(runtime, sim)
    # Ten changes at once, no await in between: the box's cursor falls out of retention.
    sim.state.mutate([("price", f"SKU-{i:06d}", {"sku": f"SKU-{i:06d}", "amount_cents": i, "currency": "EUR"})
                      for i in range(1, 9)] + [("product", "SKU-000010", None), ("media", "products/new.jpg", {
                          "key": "products/new.jpg", "url": "https://x/new.jpg", "sha256": "00", "size": 1,
                          "content_type": "image/jpeg"})])
    await caught_up(runtime, sim)
    await same_catalog(runtime, sim)
    state = await runtime.db.read(sync_state)
    assert state.snapshots == 2


async def test_a_sale_posted_twice_is_one_event_even_when_the_answer_is_lost(
        start_sim: StartSim, start_box: StartBox) -> None:
    sim, runtime = await paired(start_sim, start_box)
    await caught_up(runtime, sim)
    # The platform stores the first upload but the answer never reaches the box.
    sim.state.faults.add(Fault(kind="drop", path=f"/v1/stores/{STORE}/events", count=1))
    async with api_client(runtime) as api:
        first = await api.post("/v1/sales", json=sale("6f1c0c2e"))
        second = await api.post("/v1/sales", json=sale("6f1c0c2e"))
        assert (first.status_code, second.status_code) == (201, 200)
        assert first.json()["sale"] == second.json()["sale"]
        await drained(runtime)
        third = await api.post("/v1/sales", json=sale("6f1c0c2e"))
        assert third.status_code == 200 and third.json()["upload"]["state"] == "accepted"
    assert list(sim.state.events) == ["sale-6f1c0c2e"]
    stored = sim.state.events["sale-6f1c0c2e"]
    assert stored.event["data"]["total_cents"] == 698 and stored.event["type"] == "sale"
    # It was sent twice (the first answer was cut) under one Idempotency-Key.
    row = await runtime.db.read(lambda c: c.execute(
        "SELECT attempts, batch_key FROM events_outbox WHERE id = 'sale-6f1c0c2e'").fetchone())
    assert row[0] == 2 and row[1] == stored.idempotency_key
    assert sim.state.idempotency_keys_seen == [stored.idempotency_key]


async def test_503_and_429_retry_after_are_honoured(start_sim: StartSim, start_box: StartBox) -> None:
    # The backoff alone would retry after 50 ms; Retry-After says 1 s.
    sim, runtime = await paired(start_sim, start_box)
    await caught_up(runtime, sim)
    for status, sale_id in ((503, "ra-503"), (429, "ra-429")):
        sim.state.faults.add(Fault(kind="status", status=status, retry_after=1, path=f"/v1/stores/{STORE}/events"))
        async with api_client(runtime) as api:
            posted = time.time()
            assert (await api.post("/v1/sales", json=sale(sale_id))).status_code == 201
        await drained(runtime)
        arrived = datetime.fromisoformat(sim.state.events[f"sale-{sale_id}"].received_at).timestamp()
        assert arrived - posted >= 1.0, f"{status}: retried after {arrived - posted:.3f} s"
        assert arrived - posted < 5.0  # and not much later
        # Recovered: the loop marks itself ok just after the batch's commit, which drained() saw.
        await wait_until(lambda: runtime.sync_status.push.last_error is None, 5.0, "the push loop's recovery")
    assert runtime.metrics.value("sync_failures", loop="push", hop="http") == 2


async def test_401_asks_for_pairing_again_while_the_store_api_keeps_answering(
        start_sim: StartSim, start_box: StartBox) -> None:
    sim, runtime = await paired(start_sim, start_box)
    await caught_up(runtime, sim)
    seen = runtime.pairing_changes.version
    assert sim.state.revoke() == 1
    with trio.fail_after(10):
        await runtime.pairing_changes.wait(seen)
    assert runtime.store is not None and runtime.store.needs_repair
    saved = load_pairing(Path(runtime.config.storage.dir))
    assert saved is not None and saved.needs_repair  # a restart still knows
    async with api_client(runtime) as api:
        assert (await api.get("/v1/products/SKU-000001")).status_code == 200
        assert (await api.post("/v1/sales", json=sale("during-401"))).status_code == 201
    async with api_client(runtime, "admin") as admin:
        status = (await admin.get("/api/status")).json()["cloud"]
        assert status["pairing"]["state"] == "repair_needed"
        home = (await admin.get("/")).text
        assert "pair again" in home
    checks = {c.name: c for c in await runtime.health.run_all()}
    assert checks["cloud.pairing"].status == "fail"
    # No more calls with the refused token: the event waits.
    await trio.sleep(0.3)
    assert "sale-during-401" not in sim.state.events
    # Pairing again through the homepage form resumes everything.
    async with api_client(runtime, "admin") as admin:
        answer = await admin.post("/pairing", data={"code": sim.pair_code, "token": ADMIN})
        assert answer.status_code == 303
    await drained(runtime)
    assert "sale-during-401" in sim.state.events
    assert runtime.store is not None and not runtime.store.needs_repair


async def test_sync_status_is_shown_with_the_failing_hop(start_sim: StartSim, start_box: StartBox) -> None:
    sim, runtime = await paired(start_sim, start_box)
    await caught_up(runtime, sim)
    sim.state.faults.add(Fault(kind="status", status=500, path=f"/v1/stores/{STORE}/changes", count=1000))
    await wait_until(lambda: runtime.sync_status.pull.last_error is not None, 5.0, "a pull failure")
    async with api_client(runtime, "admin") as admin:
        cloud = (await admin.get("/api/status")).json()["cloud"]
        home = (await admin.get("/")).text
    assert cloud["last_error"]["hop"] == "http" and cloud["last_error"]["status"] == 500
    assert "answered HTTP 500" in cloud["last_error"]["message"]
    assert "failing (http)" in home
    checks = {c.name: c for c in await runtime.health.run_all()}
    assert checks["cloud.link"].status == "warn" and "HTTP 500" in checks["cloud.link"].message
    assert checks["cloud.replica"].status == "ok"
    sim.state.faults.clear()
    await wait_until(lambda: runtime.sync_status.pull.last_error is None, 5.0, "recovery")


async def test_a_refused_event_is_rejected_alone_and_never_retried(start_sim: StartSim, start_box: StartBox) -> None:
    sim, runtime = await paired(start_sim, start_box, push_batch=4)
    await caught_up(runtime, sim)
    # Write four events directly (as the dispatcher would for statuses): one the platform refuses.
    from appliance.storage.events import enqueue

    def add(conn: sqlite3.Connection) -> None:
        for i in range(4):
            data = {"device_id": "k1", "status": "online" if i != 2 else "exploded"}
            enqueue(conn, id=f"dev-{i}", kind="device.status", now=time.time(), body=json.dumps(
                {"id": f"dev-{i}", "type": "device.status", "at": "2025-03-01T09:30:00Z", "data": data}))

    await runtime.db.write(add)
    runtime.uplink_changes.notify()
    await drained(runtime)
    assert sorted(sim.state.events) == ["dev-0", "dev-1", "dev-3"]
    stats = await runtime.db.read(outbox_stats)
    assert (stats.accepted, stats.rejected) == (3, 1)
    reason = await runtime.db.read(partial(lambda c: c.execute(
        "SELECT reason FROM events_outbox WHERE id = 'dev-2'").fetchone()[0]))
    assert "data.status" in reason
    checks = {c.name: c for c in await runtime.health.run_all()}
    assert checks["cloud.outbox"].status == "warn" and "1 rejected" in checks["cloud.outbox"].message


async def test_stopping_the_box_closes_its_connections_to_the_platform(start_sim: StartSim,
                                                                       make_config: Any) -> None:
    import gc

    from appliance.services.assembly import service_specs
    from appliance.supervisor import open_runtime, supervise_all

    sim = await start_sim()
    runtime = await open_runtime(make_config(cloud=fast_cloud(sim)))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: supervise_all(runtime, service_specs(runtime),
                                                                  task_status=task_status))
            await pair_from_web(runtime, sim.pair_code)
            await caught_up(runtime, sim)
            await wait_until(lambda: len(sim.state.heartbeats) > 0, 10.0, "a heartbeat")
            runtime.stopping.set()  # cancels the sync loops with their connections open
    finally:
        runtime.db.close()
    # A socket left to the garbage collector warns (ResourceWarning), which fails the test.
    gc.collect()


async def test_a_resync_request_pulls_at_once(start_sim: StartSim, start_box: StartBox) -> None:
    sim, runtime = await paired(start_sim, start_box, pull_interval_s=600.0)
    await caught_up(runtime, sim)
    sim.state.mutate([("price", "SKU-000001", {"sku": "SKU-000001", "amount_cents": 1, "currency": "EUR"})])
    runtime.resync_requests.notify()  # what the support channel's "resync" does
    await caught_up(runtime, sim, 5.0)  # not the 600 s interval
