"""Online order latency: from the platform's send (the real SDK, AMQP over WebSockets with
TLS, to the test AMQP peer on loopback) to the kitchen screen's ack of ``order.created``
(a device simulator on loopback), through a whole appliance in this process.

    python -m benchmarks.orders [--orders N] [--max-wait S]

Latency: orders one at a time (the next is sent once the last is on the device), from
just before the send to the device's ack. Throughput: then the same number in a burst. Needs the
test dependencies (python-qpid-proton for the peer). Prints one JSON line: p50, p90, p99,
max in milliseconds, and the burst's orders per second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import trio


async def _run(orders: int, max_wait_s: float, tmp: Path, server: Any) -> dict[str, Any]:
    from appliance.config import parse_config
    from appliance.devkit.cloud_orders import OrderMessage
    from appliance.devkit.device import DeviceSimulator, run_device_simulator
    from appliance.devkit.orders_sender import OrderSender
    from appliance.services.assembly import service_specs
    from appliance.services.servicebus import LinkOptions
    from appliance.supervisor import open_runtime, supervise_all

    queue = f"bench-{uuid.uuid4().hex[:8]}"
    kds = DeviceSimulator(device_id="kds-1", kind="kds")
    sent_at: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(run_device_simulator, kds, port=0, bind="127.0.0.1"))
        ports = dict.fromkeys(["admin", "api", "events", "media", "provisioning", "ops", "support", "discovery"], 0)
        config = parse_config({
            "lan": {"bind": "127.0.0.1", "ports": ports}, "storage": {"dir": str(tmp / "state")},
            "admin": {"token": "bench"}, "cloud": {"api_url": "https://127.0.0.1:9"},
            "discovery": {"enabled": False}, "log": {"level": "warning"},
            "devices": [{"id": "kds-1", "kind": "kds", "address": "127.0.0.1", "port": port}],
            "orders": {"enabled": True, "namespace": server.namespace, "queue": queue,
                       "sas_key_name": server.sas_key_name, "sas_key": server.sas_key, "endpoint": server.endpoint,
                       "ca_file": server.ca_file, "max_wait_s": max_wait_s}})
        runtime = await open_runtime(config)
        sender = OrderSender(LinkOptions(namespace=server.namespace, queue=queue, sas_key_name=server.sas_key_name,
                                         sas_key=server.sas_key, endpoint=server.endpoint, ca_file=server.ca_file))
        try:
            async with trio.open_nursery() as box:
                await box.start(lambda task_status: supervise_all(runtime, service_specs(runtime),
                                                                  task_status=task_status))
                # One order first: connections open (not measured).
                await sender(OrderMessage(order_id="warm-up", body=_body("warm-up")))
                await _arrived(kds, 1)
                # Latency: one order at a time, the next sent once the last one is on the device.
                for i in range(orders):
                    oid = f"web-{i:06d}"
                    sent_at[oid] = time.time()
                    await sender(OrderMessage(order_id=oid, body=_body(oid)))
                    await _arrived(kds, i + 2)
                # Throughput: a burst of orders sent as fast as the SDK sends them.
                start = time.perf_counter()
                for i in range(orders):
                    await sender(OrderMessage(order_id=f"burst-{i:06d}", body=_body(f"burst-{i:06d}")))
                await _arrived(kds, 2 * orders + 1)
                elapsed = time.perf_counter() - start
                runtime.stopping.set()
        finally:
            await sender.aclose()
            runtime.db.close()
        nursery.cancel_scope.cancel()
    latencies = sorted((c.received_at - sent_at[c.body["order"]["order_id"]]) * 1000 for c in kds.accepted
                       if c.body["order"]["order_id"] in sent_at)
    q = statistics.quantiles(latencies, n=100)
    return {"orders": len(latencies), "p50_ms": round(q[49], 1), "p90_ms": round(q[89], 1),
            "p99_ms": round(q[98], 1), "max_ms": round(latencies[-1], 1),
            "burst_orders_per_s": round(orders / elapsed, 1),
            "max_wait_s": max_wait_s}


async def _arrived(kds: Any, count: int) -> None:
    with trio.fail_after(120):
        while True:
            if len(kds.accepted) >= count:
                return
            await trio.sleep(0.001)


def _body(order_id: str) -> dict[str, Any]:
    return {"order_id": order_id, "channel": "click_and_collect", "currency": "EUR", "total_cents": 698,
            "lines": [{"sku": "SKU-000007", "name": "Croissant", "qty": 2, "unit_price_cents": 349}]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.orders")
    parser.add_argument("--orders", type=int, default=300)
    parser.add_argument("--max-wait", type=float, default=5.0, help="the receiver's [orders] max_wait_s")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.amqp.fixtures import run_server  # the test AMQP peer (python-qpid-proton)

    with tempfile.TemporaryDirectory() as tmp, run_server(Path(tmp) / "tls", sas_key=uuid.uuid4().hex) as server:
        result = trio.run(_run, args.orders, args.max_wait, Path(tmp), server)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
