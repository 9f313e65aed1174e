"""The real `appliance run` process shipping its log ring to the simulator's intake:
exactly once across a SIGKILL (through tinyproxy, TLS verified); and a week of records
while the intake is down: the ring within its cap, RSS flat, /healthz answering under
20 ms at p99, then the ring drained in order with the dropped count reported."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import trio

from appliance.devkit.cloud_faults import Fault
from tests.realbox import loopback_config
from tests.sync_helpers import StartSim, wait_until

if TYPE_CHECKING:
    from appliance.devkit.cloud import SimHandle
    from tests.proxy import Tinyproxy

pytest_plugins = ["tests.sync_fixtures", "tests.proxy"]

_READY = re.compile(r"ready: (.*)$", re.MULTILINE)
# The demo's volume at the box's default level, measured by benchmarks/logs.py: about
# 120 records an hour, so a week is about 20,000 records, flooded here at 2,000 a second.
WEEK_RECORDS = 20_000
FLOOD_AFTER_S = 3.0


def config_file(tmp_path: Path, sim: SimHandle, *, logs: dict[str, Any], proxy: str = "") -> Path:
    logs_lines = "\n".join(f"{k} = {v}" for k, v in logs.items() if k != "testing")  # numbers only
    seams = "\n".join(f"{k} = {v}" for k, v in logs.get("testing", {}).items())
    return loopback_config(tmp_path, token="process-admin-token-0123456789", tables=f"""
[wan]
proxy = "{proxy}"
[cloud]
api_url = "{sim.url}"
ca_file = "{sim.ca_path}"
[logs]
url = "{sim.url}/v1/input"
api_key = "{sim.state.logs.api_key}"
ca_file = "{sim.ca_path}"
{logs_lines}
[logs.testing]
{seams}
""")


class Box:
    """One `appliance run` process, its stderr in a file; ports read from its ready line."""

    def __init__(self, config: Path, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")}
        self.log = log
        with log.open("a") as stderr:
            self.proc = subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config", str(config)],
                                         env=env, stderr=stderr, stdout=subprocess.DEVNULL)
        self.ports: dict[str, int] = {}

    async def ready(self) -> None:
        with trio.fail_after(30):
            while True:
                found = _READY.findall(self.log.read_text())
                if len(found) >= self.starts:
                    self.ports = {k: int(v) for k, v in (item.split("=") for item in found[-1].split(", "))}
                    return
                assert self.proc.poll() is None, self.log.read_text()
                await trio.sleep(0.05)  # another process: nothing to wait on but its log

    starts = 1

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(15)


async def test_records_ship_exactly_once_across_a_sigkill_through_the_proxy(
        start_sim: StartSim, tinyproxy: Tinyproxy, tmp_path: Path) -> None:
    sim = await start_sim()
    cfg = config_file(tmp_path, sim, proxy=tinyproxy.url, logs={
        "interval_s": 0.05, "flush_interval_s": 0.05, "batch_records": 100, "uplink_bytes_per_s": 10_000_000,
        "backoff_initial_s": 0.05, "backoff_max_s": 0.5, "testing": {"flood_per_s": 500.0}})
    intake = sim.state.logs
    box = Box(cfg, tmp_path / "stderr.log")
    try:
        await box.ready()
        await wait_until(lambda: len(intake.records) >= 1500, 30.0, "records at the intake")
        box.stop(signal.SIGKILL)
        killed_at = max(intake.seqs())
        box = Box(cfg, tmp_path / "stderr.log")
        box.starts = 2
        await box.ready()
        await wait_until(lambda: max(intake.seqs()) >= killed_at + 1500, 30.0, "records after the restart")
        assert box.stop() == 0
    finally:
        if box.proc.poll() is None:
            box.stop(signal.SIGKILL)
    [ring] = {r for r, _ in intake.records}
    seqs = intake.seqs(ring)
    assert seqs == list(range(1, len(seqs) + 1)), "every record once, in order, none missing"
    assert intake.dropped_reported == 0
    # On the wire a batch may go twice (killed between the intake's answer and the saved
    # cursor); the intake keeps it once. Anything more would be a cursor that went back.
    assert intake.duplicates <= 100, intake.summary()
    assert set(tinyproxy.connects()) == {f"127.0.0.1:{sim.port}"}


async def test_a_week_offline_keeps_the_ring_capped_and_the_loop_responsive_then_drains(
        start_sim: StartSim, tmp_path: Path) -> None:
    sim = await start_sim()
    ring_cap = 1024 * 1024
    # The intake is down: every batch gets 503 with Retry-After.
    sim.state.faults.add(Fault(kind="status", path="/v1/input", status=503, retry_after=1, count=1_000_000))
    cfg = config_file(tmp_path, sim, logs={
        "ring_bytes": ring_cap, "interval_s": 0.1, "batch_records": 1000, "uplink_bytes_per_s": 10_000_000,
        "backoff_initial_s": 0.1, "backoff_max_s": 1.0,
        "testing": {"flood_per_s": 2000.0, "flood_after_s": FLOOD_AFTER_S, "flood_records": WEEK_RECORDS}})
    box = Box(cfg, tmp_path / "stderr.log")
    baseline: list[float] = []
    after: list[float] = []
    latencies: list[float] = []
    rss: list[int] = []
    try:
        await box.ready()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{box.ports['ops']}", trust_env=False,
                                     timeout=5) as ops:
            ring_dir = tmp_path / "state" / "logs"

            def ring_size() -> int:
                total = 0
                for seg in ring_dir.glob("seg-*"):
                    # The box drops the oldest segment between the listing and the stat.
                    with contextlib.suppress(FileNotFoundError):
                        total += seg.stat().st_size
                return total

            async def probe_until(done: Any, into: list[float]) -> None:
                while not done():
                    started = time.perf_counter()
                    assert (await ops.get("/healthz")).status_code == 200
                    into.append(time.perf_counter() - started)
                    rss.append(box.rss_kib())
                    assert ring_size() <= ring_cap + 128 * 1024, "the ring is over its cap"
                    await trio.sleep(0.02)

            # The same probe before the flood: the baseline of this machine at this moment.
            until_flood = time.monotonic() + FLOOD_AFTER_S - 0.5
            await probe_until(lambda: time.monotonic() >= until_flood, baseline)
            rss.clear()
            flood_done = re.compile(rf"synthetic record {WEEK_RECORDS}:")
            await probe_until(lambda: flood_done.search(tail_of(box.log)) is not None or
                              box.proc.poll() is not None, latencies)
            assert box.proc.poll() is None
            assert sim.state.logs.batches == 0
            sim.state.faults.clear()  # the intake is back
            intake = sim.state.logs
            await probe_until(lambda: intake.records and max(intake.seqs()) >= WEEK_RECORDS, latencies)
            # The same probe once the box is idle again: the machine's baseline at the end, as a
            # shared machine's load moves during the minute this test runs.
            until_idle = time.monotonic() + FLOOD_AFTER_S - 0.5
            await probe_until(lambda: time.monotonic() >= until_idle, after)
        assert box.stop() == 0
    finally:
        if box.proc.poll() is None:
            box.stop(signal.SIGKILL)
    seqs = intake.seqs()
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), "drained in order, each once"
    kept_from = seqs[0]
    # Everything before what the ring still held was dropped, and said so.
    missing = sum(b - a - 1 for a, b in zip([0, *seqs], seqs, strict=False))
    assert missing > WEEK_RECORDS // 2 and intake.dropped_reported == missing, (kept_from, missing,
                                                                                  intake.summary())
    # Under 20 ms at p99 (benchmarks/logs.py measures it on a quiet machine); on a shared,
    # loaded one the test holds the flood to the machine's own baseline of the moment.
    # The baseline is the worse of the two idle windows (before the flood, after the drain).
    p99 = statistics.quantiles(latencies, n=100)[98]
    base99 = max(statistics.quantiles(x, n=100)[98] for x in (baseline, after))
    p50, base50 = statistics.median(latencies), max(statistics.median(baseline), statistics.median(after))
    words = (f"/healthz p99 {p99 * 1000:.1f} ms (baseline {base99 * 1000:.1f}), median {p50 * 1000:.1f} ms "
             f"(baseline {base50 * 1000:.1f}) over {len(latencies)} probes, {len(baseline)} + {len(after)} idle")
    assert p99 < max(0.020, 3 * base99) and p50 < max(0.005, 2 * base50), words
    warm = statistics.median(rss[len(rss) // 10: len(rss) // 5])
    assert max(rss[len(rss) // 5:]) < warm + 16 * 1024, f"RSS grew from {warm} KiB to {max(rss)} KiB"


def tail_of(path: Path, size: int = 65536) -> str:
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read().decode("utf-8", "replace")
