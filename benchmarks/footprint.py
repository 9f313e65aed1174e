"""Footprint: start to READY, idle RSS, RSS with 50 devices and the 100k catalog, threads, open files.

The real process (``python -m appliance run``, as shipped but for loopback ports), next
to a baseline measured in the same run: a bare hypercorn hello-world on trio in its own
process (the interpreter and the web stack, nothing of ours).

- start: from ``exec`` to the first line that says it serves (the box's ``ready:`` log
  line, written once every service started; the hello-world's bound port);
- idle: RSS, threads and open descriptors after ``--idle-seconds`` of a fresh, unpaired
  box with no device;
- loaded: the same box paired with the cloud simulator's ``--products`` catalog (synced)
  and ``--devices`` simulated devices connected (in another process), after the snapshot
  and ``--settle-seconds``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from benchmarks import _cpus
from benchmarks.soak import AUTH, device_key, rss_mb, start_box
from benchmarks.writes import Cloud, pair

MiB = 2**20


def sample(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    threads = re.search(r"Threads:\s+(\d+)", status)
    return {"rss_mb": rss_mb(pid), "threads": float(threads.group(1)) if threads else 0.0,
            "fds": float(len(os.listdir(f"/proc/{pid}/fd")))}


# --- the baseline: a bare hypercorn hello-world on trio ---------------------------------


def _hello(port_file: str) -> None:
    import trio
    from hypercorn.config import Config
    from hypercorn.trio import serve

    async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"hello"})

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(serve, app, config)  # type: ignore[arg-type]
            await trio.Path(port_file).write_text(json.dumps(urls))

    trio.run(main)


def baseline(idle_s: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-footprint-hello-") as tmp:
        ready = Path(tmp) / "ready"
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.footprint", "--hello", str(ready)])
        try:
            while not ready.exists() or not ready.read_text():
                if proc.poll() is not None:
                    raise SystemExit("the hello-world did not start")
                time.sleep(0.01)
            out = {"start_s": time.monotonic() - started}
            time.sleep(idle_s)
            out |= sample(proc.pid)
            return out
        finally:
            proc.terminate()
            proc.wait(10)


# --- ours -------------------------------------------------------------------------------


def device_farm(count: int) -> tuple[subprocess.Popen[str], list[tuple[str, int]]]:
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.footprint", "--serve-devices", str(count)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ports: list[int] = json.loads(proc.stdout.readline())
    return proc, [(f"dev-{i:02d}", p) for i, p in enumerate(ports)]


def _serve_devices(count: int) -> None:
    from functools import partial

    import trio

    from appliance.devkit.device import DeviceSimulator, run_device_simulator

    async def main() -> None:
        sims = [DeviceSimulator(device_id=f"dev-{i:02d}", key=device_key(f"dev-{i:02d}")) for i in range(count)]
        async with trio.open_nursery() as nursery:
            ports = [await nursery.start(partial(run_device_simulator, s, port=0, bind="127.0.0.1")) for s in sims]
            print(json.dumps(ports), flush=True)
            stdin = trio.lowlevel.FdStream(os.dup(0))
            while await stdin.receive_some():
                pass
            nursery.cancel_scope.cancel()

    trio.run(main)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def ours(args: argparse.Namespace, root: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    started = time.monotonic()
    proc, _bound, _log = start_box(root / "idle", [])
    out["start_s"] = time.monotonic() - started
    try:
        time.sleep(args.idle_seconds)
        out |= sample(proc.pid)
    finally:
        stop(proc)
    cloud = Cloud(root, args.products)
    farm, devices = device_farm(args.devices)
    try:
        proc, bound, _log = start_box(root / "loaded", devices, cloud=cloud.section())
        try:
            pair(root / "loaded" / "appliance.toml", cloud.ready["pair_code"])
            deadline = time.monotonic() + 900
            last = f"http://127.0.0.1:{bound['api']}/v1/products/SKU-{args.products:06d}"
            metrics = f"http://127.0.0.1:{bound['ops']}/metrics"
            with httpx.Client(headers=AUTH, timeout=30) as client:
                while client.get(last).status_code != 200:
                    if time.monotonic() > deadline:
                        raise SystemExit("the snapshot did not arrive")
                    time.sleep(0.5)
                while client.get(metrics).text.count("appliance_device_link_connected{") < args.devices or \
                        re.search(r"appliance_device_link_connected\{[^}]*\} 0", client.get(metrics).text):
                    if time.monotonic() > deadline:
                        raise SystemExit("the devices did not all connect")
                    time.sleep(0.5)
            time.sleep(args.settle_seconds)
            out |= {f"loaded_{k}": v for k, v in sample(proc.pid).items()}
            out["loaded_peak_rss_mb"] = rss_mb(proc.pid, "VmHWM")
        finally:
            stop(proc)
    finally:
        assert farm.stdin is not None
        farm.stdin.close()
        farm.wait(10)
        cloud.close()
    return out


def main(args: argparse.Namespace) -> None:
    base = baseline(args.idle_seconds)
    with tempfile.TemporaryDirectory(prefix="bench-footprint-", dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
        root = Path(tmp)
        (root / "idle").mkdir()
        (root / "loaded").mkdir()
        box = ours(args, root)
    print(f"footprint: the real process vs a bare hypercorn hello-world on trio (same interpreter); idle "
          f"{args.idle_seconds:g} s; loaded: {args.products:,} products synced, {args.devices} devices connected")
    print(f"{'':34}{'hello-world':>13}{'appliance':>13}{'ratio':>8}")
    rows = [("start to READY, s", base["start_s"], box["start_s"], ".2f"),
            ("idle RSS, MiB", base["rss_mb"], box["rss_mb"], ".1f"),
            ("idle threads", base["threads"], box["threads"], ".0f"),
            ("idle open files", base["fds"], box["fds"], ".0f"),
            ("loaded RSS, MiB", base["rss_mb"], box["loaded_rss_mb"], ".1f"),
            ("loaded peak RSS (VmHWM), MiB", base["rss_mb"], box["loaded_peak_rss_mb"], ".1f"),
            ("loaded threads", base["threads"], box["loaded_threads"], ".0f"),
            ("loaded open files", base["fds"], box["loaded_fds"], ".0f")]
    for name, b, o, fmt in rows:
        print(f"{name:34}{b:>13{fmt}}{o:>13{fmt}}{o / b if b else float('nan'):>7.1f}x")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench footprint", description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--idle-seconds", type=float, default=60.0)
    p.add_argument("--settle-seconds", type=float, default=10.0)
    p.add_argument("--products", type=int, default=100_000)
    p.add_argument("--devices", type=int, default=50)
    p.add_argument("--hello", metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("--serve-devices", type=int, help=argparse.SUPPRESS)
    _cpus.add_option(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.hello:
        _hello(arguments.hello)
    elif arguments.serve_devices:
        _serve_devices(arguments.serve_devices)
    else:
        _cpus.run(main, arguments)
