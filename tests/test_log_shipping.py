"""Shipping the log ring to the simulator's log intake, in the test's loop: through a real
proxy (tinyproxy) with TLS verified, each record kept once and in order through the
intake's faults (5xx, 429 with Retry-After, slow, cut), and no planted secret in any batch."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import pytest
import trio

from appliance.devkit.cloud_faults import Fault
from appliance.protocol.logship import Outcome, Pacer, classify, encode_batch, retry_after_s
from appliance.protocol.redact import Redactor
from appliance.services.pairing import pair_from_web
from appliance.services.runtime import Runtime
from tests.sync_helpers import ADMIN, StartBox, StartSim, fast_cloud, wait_until

if TYPE_CHECKING:
    from appliance.devkit.cloud import SimHandle
    from tests.proxy import Tinyproxy

pytest_plugins = ["tests.sync_fixtures", "tests.proxy"]

log = logging.getLogger("appliance.test.shipping")

PROXY_PASSWORD = "pr0xy-Pa55word"
DEVICE_KEY = "5e" * 32


def fast_logs(**extra: Any) -> dict[str, Any]:
    return {"interval_s": 0.05, "flush_interval_s": 0.02, "backoff_initial_s": 0.05, "backoff_max_s": 0.3,
            "batch_records": 50, "uplink_bytes_per_s": 10_000_000, **extra}


def test_the_wire_pieces() -> None:
    body = encode_batch([b'{"seq":1,"msg":"token=abc123"}'], appliance_id="box", ring="r1", dropped=2,
                        redactor=Redactor())
    import zlib
    data = json.loads(zlib.decompress(body, 31))
    assert data == {"appliance_id": "box", "ring": "r1", "dropped": 2, "records": [{"seq": 1, "msg": "token=***"}]}
    pacer = Pacer(1000)
    assert pacer.delay(10.0) == 0
    pacer.sent(500, 10.0)
    assert pacer.delay(10.0) == pytest.approx(0.5) and pacer.delay(10.6) == 0
    assert retry_after_s({"retry-after": "7"}) == 7 and retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({"retry-after": "999999"}) == 3600
    assert [classify(s) for s in (200, 202, 429, 503, 500, 401, 413, 400)] == [
        Outcome.TAKEN, Outcome.TAKEN, Outcome.WAIT, Outcome.WAIT, Outcome.RETRY, Outcome.REFUSED,
        Outcome.TOO_LARGE, Outcome.REJECTED]


def shipped_seqs(sim: SimHandle, runtime: Runtime) -> list[int]:
    assert runtime.log_ring is not None
    return sim.state.logs.seqs(runtime.log_ring.ring_id)


async def test_logs_ship_through_the_proxy_once_each_in_order_through_faults_and_without_secrets(
        start_sim: StartSim, start_box: StartBox, tinyproxy: Tinyproxy) -> None:
    sim = await start_sim()
    proxy = tinyproxy.url.replace("http://", f"http://shop:{PROXY_PASSWORD}@")
    runtime = await start_box(cloud=fast_cloud(sim), wan={"proxy": proxy}, logs=fast_logs(),
                              orders={"sas_key": "config-orders-sas-key"})
    await pair_from_web(runtime, sim.pair_code)
    assert runtime.store is not None and runtime.log_ring is not None
    intake = sim.state.logs
    log.setLevel(logging.INFO)
    log.info("paired")
    await wait_until(lambda: intake.batches > 0, 20.0, "a first batch at the intake")

    # Faults, one after the other: 503 and 429 with Retry-After, a 500, slow, and an
    # answer cut after the intake kept the batch (the box must send it again).
    for fault in (Fault(kind="status", path="/v1/input", status=503, retry_after=1),
                  Fault(kind="status", path="/v1/input", status=429, retry_after=1),
                  Fault(kind="status", path="/v1/input", status=500),
                  Fault(kind="latency", path="/v1/input", delay_s=0.5),
                  Fault(kind="drop", path="/v1/input", count=2)):
        sim.state.faults.add(fault)
    store = runtime.store
    secrets = {
        "admin token": ADMIN,
        "platform token": store.token,
        "store secret": store.store_secret,
        "paired orders SAS key": str(store.services["orders"]["sas_key"]),
        "paired support SAS key": str(store.services["support"]["sas_key"]),
        "config SAS key": "config-orders-sas-key",
        "log intake key": intake.api_key,
        "proxy password": PROXY_PASSWORD,
        "device key": DEVICE_KEY,
    }
    for name, secret in secrets.items():
        log.warning("planted %s: %s (and in a field)", name, secret, extra={"detail": f"value={secret}"})
    for i in range(300):
        log.info("ordinary record %d", i)
    last = runtime.log_ring.last_seq
    await wait_until(lambda: runtime.log_shipping.cursor >= last, 30.0, "every record shipped")

    seqs = shipped_seqs(sim, runtime)
    assert seqs[: len(seqs)] == sorted(seqs), "kept in order"
    assert seqs == list(range(1, seqs[-1] + 1)), "no gap, no record twice"
    assert intake.duplicates > 0, "the cut answers made the box send a batch again (kept once)"
    assert not sim.state.faults.pending(), "every fault was played"
    assert intake.dropped_reported == 0
    for body in intake.bodies:
        text = body.decode()
        for name, secret in secrets.items():
            assert secret not in text, f"the {name} left the box in a log batch"
    planted = [r for r in intake.records.values() if str(r["msg"]).startswith("planted")]
    assert len(planted) == len(secrets)
    connects = tinyproxy.connects()
    assert connects and set(connects) == {f"127.0.0.1:{sim.port}"}, "every batch went through the proxy"


async def test_an_intake_that_refuses_the_key_is_retried_slowly_and_shown(start_sim: StartSim,
                                                                          start_box: StartBox) -> None:
    sim = await start_sim()
    runtime = await start_box(cloud=fast_cloud(sim), logs=fast_logs(
        url=f"{sim.url}/v1/input", api_key="not-the-key", ca_file=str(sim.ca_path)))
    log.warning("something to ship")
    await wait_until(lambda: str(runtime.log_shipping.phase) == "refused", 10.0, "the refusal")
    checks = {c.name: c for c in await runtime.health.run_all()}
    assert str(checks["logs.shipping"].status) == "warn" and "403" in checks["logs.shipping"].message
    assert sim.state.logs.batches == 0


async def test_without_an_intake_shipping_is_off(start_box: StartBox) -> None:
    runtime = await start_box(logs=fast_logs())
    log.warning("kept, not shipped")
    await trio.sleep(0.2)
    assert str(runtime.log_shipping.phase) == "off"
    assert runtime.log_ring is not None and runtime.log_ring.last_seq > 0, "the ring works without shipping"
