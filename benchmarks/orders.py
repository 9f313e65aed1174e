"""Online order latency: from the platform's send (the real SDK, AMQP over WebSockets with
TLS, to the test AMQP peer on loopback) to the kitchen screen's ack of ``order.created``
(a device simulator on loopback), through a whole appliance in this process.

    python -m benchmarks.orders [--orders N] [--max-wait S] [--media-mb MB [--media-rate B]]

Latency: orders one at a time (the next is sent once the last is on the device), from
just before the send to the device's ack. Throughput: then the same number in a burst. Needs the
test dependencies (python-qpid-proton for the peer). Prints one JSON line: p50, p90, p99,
max in milliseconds, and the burst's orders per second.

``--media-mb``: then the box is paired with a cloud simulator (its own process) whose
catalog has one large media file of that size, and the latency is measured again while the
box downloads it (``[media] max_rate`` = ``--media-rate``, default the box's default): the
"media" figures sit next to the first ones, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import trio

from benchmarks import _cpus


def _quantiles(latencies: list[float]) -> dict[str, float]:
    q = statistics.quantiles(sorted(latencies), n=100)
    return {"orders": len(latencies), "p50_ms": round(q[49], 1), "p90_ms": round(q[89], 1),
            "p99_ms": round(q[98], 1), "max_ms": round(max(latencies), 1)}


async def _run(orders: int, max_wait_s: float, tmp: Path, server: Any, *, sim: dict[str, Any] | None = None,
               media_rate: int | None = None) -> dict[str, Any]:
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
                       "sas_key_name": server.sas_key_name, "sas_key": server.sas_key,
                       "testing": {"endpoint": server.endpoint}, "ca_file": server.ca_file, "max_wait_s": max_wait_s},
            **({"cloud": {"api_url": sim["url"], "ca_file": sim["ca"], "pull_interval_s": 1.0}} if sim else {}),
            **({"media": {"max_rate": media_rate}} if media_rate is not None else {})})
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
                media = await _during_download(runtime, sender, kds, orders, sim) if sim else None
                runtime.stopping.set()
        finally:
            await sender.aclose()
            runtime.db.close()
        nursery.cancel_scope.cancel()
    latencies = [(c.received_at - sent_at[c.body["order"]["order_id"]]) * 1000 for c in kds.accepted
                 if c.body["order"]["order_id"] in sent_at]
    result: dict[str, Any] = {**_quantiles(latencies), "burst_orders_per_s": round(orders / elapsed, 1),
                              "max_wait_s": max_wait_s}
    if media is not None:
        result["during_media_download"] = media
    return result


async def _during_download(runtime: Any, sender: Any, kds: Any, orders: int, sim: dict[str, Any]) -> dict[str, Any]:
    """Pair with the simulator, wait for the large file's download to start, then send
    ``orders`` one at a time again while it runs."""
    from appliance.devkit.cloud_orders import OrderMessage
    from appliance.services.pairing import pair_from_web

    await pair_from_web(runtime, sim["pair_code"])
    with trio.fail_after(120):
        while runtime.media is None or not runtime.media.status.downloading:  # noqa: ASYNC110 (another service's state)
            await trio.sleep(0.05)
    status = runtime.media.status
    done_before, start = status.fill_done_bytes, time.perf_counter()
    sent_at: dict[str, float] = {}
    first = len(kds.accepted)
    for i in range(orders):
        oid = f"media-{i:06d}"
        sent_at[oid] = time.time()
        await sender(OrderMessage(order_id=oid, body=_body(oid)))
        await _arrived(kds, first + i + 1)
    elapsed = time.perf_counter() - start
    still = bool(status.downloading)
    latencies = [(c.received_at - sent_at[c.body["order"]["order_id"]]) * 1000 for c in kds.accepted
                 if c.body["order"]["order_id"] in sent_at]
    return {**_quantiles(latencies), "media_rate_bytes_per_s": runtime.config.media.max_rate,
            "downloaded_bytes_meanwhile": status.fill_done_bytes - done_before,
            "download_mb_per_s": round((status.fill_done_bytes - done_before) / elapsed / 1e6, 2),
            "download_still_running_at_the_end": still}


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
    parser.add_argument("--media-mb", type=int, default=0,
                        help="also measure while the box downloads a media file of this many MB")
    parser.add_argument("--media-rate", type=int, default=None,
                        help="[media] max_rate for that download (bytes/s; 0 = none; default the box's default)")
    _cpus.add_option(parser)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.amqp.fixtures import run_server  # the test AMQP peer (python-qpid-proton)

    with tempfile.TemporaryDirectory() as tmp, run_server(Path(tmp) / "tls", sas_key=uuid.uuid4().hex) as server:
        sim_proc = None
        sim = None
        if args.media_mb:
            sim_proc = subprocess.Popen(
                [sys.executable, "-m", "appliance", "devkit", "cloud", "--products", "20", "--videos", "1",
                 "--video-bytes", str(args.media_mb * 1_000_000), "--tls-dir", str(Path(tmp) / "sim")],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            assert sim_proc.stdout is not None
            sim = json.loads(sim_proc.stdout.readline())
        try:
            result = trio.run(partial(_run, args.orders, args.max_wait, Path(tmp), server, sim=sim,
                                      media_rate=args.media_rate))
        finally:
            if sim_proc is not None:
                sim_proc.terminate()
                sim_proc.wait(15)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    _cpus.run_main(main)
