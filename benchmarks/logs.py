"""The log ring's writes (bytes per record and per hour at the demo's volume) and shipping's CPU per 1,000 records.

    python -m benchmarks.logs [--records N] [--demo-seconds S] [--ship-records N]

1. **Bytes written per record**, on this machine's disk, counted by the kernel
   (``/proc/self/io`` ``write_bytes``: what reached the block layer, file system metadata
   and journal included), for the ring (buffered, no fsync per record) and, as the
   baseline in the same run, a naive log that appends and fsyncs each record.
2. **The demo's volume**: the demo (``appliance demo``'s shop: kiosk orders every 5 s,
   price changes, the simulated platform) with the box at its default level, ``info``,
   for ``--demo-seconds``; its records per hour, times the ring's bytes per record, give
   bytes per hour, and how many days the default ring (64 MiB) holds.
3. **Shipping CPU**: ``--ship-records`` records read from a ring, redacted, gzipped and
   sent in batches over HTTPS to the cloud simulator running as a separate process (so
   its CPU is not counted); this process's CPU time (every thread) per 1,000 records,
   beside the CPU of logging those records into the ring in the first place.

4. **The event loop under a flood**: the real ``appliance run`` process, ``/healthz``
   probed every 20 ms for ``--flood-seconds`` before (the baseline) and during a flood of
   ``--flood-rate`` records a second with the log intake unreachable: p50 and p99.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio

from benchmarks import _cpus

MESSAGES = (
    "order %s accepted from device pos-1: 3 lines, 1247 cents",
    "command %s acked by kitchen-1 after 0.012 s",
    "price change %s pulled: cursor 48213",
    "heartbeat %s sent; platform time 2026-11-29T10:00:00.402Z, drift 0.01 s",
)


def _write_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/self/io")


def _emit(logger: logging.Logger, n: int) -> None:
    for i in range(n):
        logger.info(MESSAGES[i % len(MESSAGES)], f"web-{i:06d}", extra={"device": "kitchen-1"})


def ring_bytes(directory: Path, records: int) -> dict[str, Any]:
    from appliance.storage.logring import LogRing, RingHandler

    logger = logging.getLogger("bench.ring")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    os.sync()
    before = _write_bytes()
    ring = LogRing.open(directory / "ring", ring_bytes=64 * 1024 * 1024, flush_interval_s=1.0)
    handler = RingHandler(ring)
    logger.addHandler(handler)
    cpu = time.process_time()
    # Spread over time as a box logs (a burst per 100 ms), not one huge burst.
    for _ in range(records // 100):
        _emit(logger, 100)
        time.sleep(0.002)
    ring.close()
    cpu = time.process_time() - cpu
    logger.removeHandler(handler)
    os.sync()
    ring_physical = _write_bytes() - before
    stats_bytes = sum(p.stat().st_size for p in (directory / "ring").glob("seg-*"))

    # Baseline: append and fsync every record (what a naive durable log would do).
    naive = directory / "naive.log"
    sample = [json.dumps({"seq": i, "ts": time.time(), "level": "info", "logger": "bench",
                          "msg": MESSAGES[i % len(MESSAGES)] % f"web-{i:06d}"}).encode() + b"\n"
              for i in range(min(records, 2000))]
    os.sync()
    before = _write_bytes()
    fd = os.open(naive, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for line in sample:
            os.write(fd, line)
            os.fsync(fd)
    finally:
        os.close(fd)
    os.sync()
    naive_physical = _write_bytes() - before
    return {"records": records, "ring_logical_bytes_per_record": round(stats_bytes / records, 1),
            "ring_disk_bytes_per_record": round(ring_physical / records, 1),
            "baseline_fsync_each_disk_bytes_per_record": round(naive_physical / len(sample), 1),
            "ratio_baseline_to_ring": round((naive_physical / len(sample)) / max(1.0, ring_physical / records), 1),
            "log_cpu_ms_per_1000": round(cpu / records * 1e6, 1)}


async def demo_volume(state: Path, seconds: float) -> dict[str, Any]:
    from appliance.commands.demo_shop import DemoOptions, run_demo

    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    async with trio.open_nursery() as nursery:
        runtime = await nursery.start(partial(run_demo, DemoOptions(state_dir=state, port_offset=20000 + os.getpid()
                                                                    % 20000), say=lambda line: None))
        ring = runtime.log_ring
        while ring is None:
            await trio.sleep(0.05)
            ring = runtime.log_ring
        await trio.sleep(10)  # past the start-up and the first snapshot: the steady state
        first = ring.last_seq
        await trio.sleep(seconds)
        last = ring.last_seq
        shipped = runtime.log_shipping.shipped
        nursery.cancel_scope.cancel()
    per_hour = (last - first) / seconds * 3600
    return {"demo_seconds": seconds, "demo_records": last - first, "demo_records_per_hour": round(per_hour),
            "demo_records_shipped": shipped}


async def ship_cpu(directory: Path, records: int, ready: dict[str, Any]) -> dict[str, Any]:
    from appliance.protocol.logship import encode_batch
    from appliance.protocol.redact import Redactor
    from appliance.services.wan import open_client
    from appliance.storage.logring import LogRing, RingHandler, RingReader

    logger = logging.getLogger("bench.ship")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    ring = LogRing.open(directory / "ship", ring_bytes=256 * 1024 * 1024, flush_interval_s=1.0)
    logger.addHandler(RingHandler(ring))
    log_cpu = time.process_time()
    _emit(logger, records)
    ring.flush(60)
    log_cpu = time.process_time() - log_cpu
    ring.close()
    async with open_client(ready["url"], ca_file=ready["ca"], connect_timeout_s=10, read_timeout_s=30) as client:
        paired = (await client.post("/v1/appliances/pair", json={"code": ready["pair_code"],
                                                                 "appliance_id": "bench", "firmware": "0"})).json()
        url, key = paired["services"]["logs"]["url"], paired["services"]["logs"]["api_key"]
        reader = RingReader(directory / "ship")
        redactor = Redactor([key, paired["token"]])
        cursor = sent = 0
        cpu = time.process_time()
        wall = time.perf_counter()
        while True:
            batch = await trio.to_thread.run_sync(partial(reader.read_after, cursor, max_records=1000,
                                                          max_bytes=512 * 1024))
            if not batch.lines:
                break
            body = await trio.to_thread.run_sync(partial(encode_batch, batch.lines, appliance_id="bench",
                                                         ring=ring.ring_id, dropped=0, redactor=redactor))
            answer = await client.post(url, content=body, headers={
                "X-Api-Key": key, "Content-Type": "application/json", "Content-Encoding": "gzip"})
            answer.raise_for_status()
            cursor, sent = batch.last, sent + len(body)
        cpu = time.process_time() - cpu
        wall = time.perf_counter() - wall
    return {"ship_records": records, "ship_cpu_ms_per_1000": round(cpu / records * 1e6, 1),
            "baseline_log_cpu_ms_per_1000": round(log_cpu / records * 1e6, 1),
            "ratio_ship_to_log": round(cpu / log_cpu, 2), "ship_wall_s": round(wall, 2),
            "ship_wire_bytes_per_record": round(sent / records, 1)}


def _probe(client: Any, seconds: float) -> list[float]:
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        client.get("/healthz").raise_for_status()
        out.append(time.perf_counter() - started)
        time.sleep(0.02)
    return out


def flood_latency(root: Path, seconds: float, rate: float) -> dict[str, Any]:
    import re
    import statistics

    import httpx

    ports = "\n".join(f"{r} = 0" for r in ("admin", "api", "events", "media", "provisioning", "ops", "support"))
    config = root / "flood.toml"
    config.write_text(f"""[lan]\nbind = "127.0.0.1"\n[lan.ports]\n{ports}\n[storage]\ndir = "{root / 'flood'}"
[discovery]\nenabled = false\n[orders]\nenabled = false\n[cloud]\napi_url = "https://127.0.0.1:9"
[logs]\nurl = "https://127.0.0.1:9/v1/input"\napi_key = "k"\nring_bytes = 4194304
[logs.testing]\nflood_per_s = {rate}\nflood_after_s = {seconds + 3}\n""")
    err = root / "flood.err"
    with err.open("w") as stderr, subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config",
                                                    str(config)], stderr=stderr) as box:
        try:
            while "ready:" not in err.read_text():
                time.sleep(0.1)
            found = re.search(r"ready: (.*)", err.read_text())
            assert found is not None
            ops = dict(item.split("=") for item in found.group(1).split(", "))["ops"]
            with httpx.Client(base_url=f"http://127.0.0.1:{ops}", trust_env=False) as client:
                base = _probe(client, seconds)
                time.sleep(3.5)
                flood = _probe(client, seconds)
        finally:
            box.terminate()

    def ms(values: list[float], q: int) -> float:
        return round(statistics.quantiles(values, n=100)[q - 1] * 1000, 1)

    return {"flood_rate_per_s": rate, "healthz_p50_ms": ms(flood, 50), "healthz_p99_ms": ms(flood, 99),
            "baseline_healthz_p50_ms": ms(base, 50), "baseline_healthz_p99_ms": ms(base, 99),
            "load_average": os.getloadavg()[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--records", type=int, default=20_000)
    p.add_argument("--demo-seconds", type=float, default=120.0)
    p.add_argument("--ship-records", type=int, default=50_000)
    p.add_argument("--flood-seconds", type=float, default=10.0)
    p.add_argument("--flood-rate", type=float, default=2000.0)
    _cpus.add_option(p)
    args = p.parse_args()
    # On the machine's disk, not a tmpfs: the kernel counts what reaches the block layer.
    with tempfile.TemporaryDirectory(prefix="bench-logs-", dir=Path.home()) as tmp:
        root = Path(tmp)
        out = ring_bytes(root, args.records)
        # The simulator in its own process: its CPU is not the box's.
        with subprocess.Popen([sys.executable, "-m", "appliance", "devkit", "cloud", "--tls-dir", str(root / "tls")],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as sim:
            assert sim.stdout is not None
            try:
                out |= trio.run(ship_cpu, root, args.ship_records, json.loads(sim.stdout.readline()))
            finally:
                sim.terminate()
        out |= flood_latency(root, args.flood_seconds, args.flood_rate)
        if args.demo_seconds > 0:
            out |= trio.run(demo_volume, root / "demo", args.demo_seconds)
            out["demo_ring_bytes_per_hour"] = round(out["demo_records_per_hour"] * out["ring_disk_bytes_per_record"])
            out["default_ring_holds_days"] = round(64 * 1024 * 1024 / max(1.0, out["demo_records_per_hour"]
                                                                          * out["ring_logical_bytes_per_record"])
                                                   / 24, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    _cpus.run_main(main)
