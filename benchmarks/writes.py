"""Bytes written to disk per sale, per order to three devices, per idle hour and per 100k-product snapshot.

On an SD card the bytes written are the box's lifetime. The real process
(``python -m appliance run``), paired with the cloud simulator (another process) and
with three simulated devices (two kitchen screens and a printer, in this process), as
shipped but for loopback ports. Measured from outside: ``write_bytes`` of
``/proc/<pid>/io`` (what the process sends to the disk: the WAL, checkpoints into the
database file, the log ring) and the WAL's growth (frames appended, polled).

- idle: ``--idle-seconds`` with the devices connected and the sync polling, scaled to an
  hour;
- sale: ``--sales`` sales posted one after another, each stored, uploaded to the platform
  and acknowledged by it (the run ends when every one is); net of the idle rate over the
  same time;
- order: ``--orders`` orders from a till, each stored, uploaded, and sent as a command to
  the three devices and acknowledged by them; net of the idle rate;
- snapshot: a second box, fresh, reading a ``--snapshot-products`` catalog (0: skip).

Goals (issue 16): under 32 KiB per sale and under 5 MB per idle hour. The baseline is the
payload itself: the JSON bytes of one sale as posted (what a log-structured store would
have to write at the very least).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from appliance.devkit.device import DeviceSimulator, run_device_simulator
from benchmarks import _cpus
from benchmarks._disk import wal_frames, write_bytes
from benchmarks.soak import AUTH, TOKEN, device_key, start_box

DEVICES = {"kds-1": "kds", "kds-2": "kds", "printer-1": "printer"}
KiB = 1024


def sale(n: int) -> dict[str, Any]:
    return {"id": f"s-{n:06d}", "device_id": "pos-1", "currency": "EUR", "total_cents": 698,
            "lines": [{"sku": "SKU-000007", "qty": 2, "unit_price_cents": 349}],
            "payments": [{"method": "card", "amount_cents": 698}]}


def order(n: int) -> dict[str, Any]:
    return {"id": f"o-{n:06d}", "device_id": "pos-1", "currency": "EUR", "total_cents": 1047,
            "lines": [{"sku": "SKU-000007", "qty": 3, "unit_price_cents": 349, "name": "Quiche"}]}


class WalMeter:
    """Frames appended to the WAL, polled: a restart of the WAL (after a checkpoint) is
    seen by its new salt, and the frames before it that the last poll missed are lost to
    the count (so this is a lower bound, close at a 50 ms poll)."""

    def __init__(self, wal: Path) -> None:
        self.wal = wal
        self.bytes = 0
        self._last = wal_frames(wal)

    def poll(self) -> None:
        now = wal_frames(self.wal)
        frame = now.page_size + 24
        if now.salt == self._last.salt:
            self.bytes += max(0, now.frames - self._last.frames) * frame
        else:
            self.bytes += now.frames * frame
        self._last = now

    async def run(self) -> None:
        while True:
            self.poll()
            await trio.sleep(0.05)


class Cloud:
    """``appliance devkit cloud`` in its own process."""

    def __init__(self, root: Path, products: int) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "appliance", "devkit", "cloud", "--products",
                                      str(products), "--tls-dir", str(root / "tls"), "--no-orders", "--no-support"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        self.ready: dict[str, Any] = json.loads(self.proc.stdout.readline())

    def section(self) -> str:
        return f'api_url = "{self.ready["url"]}"\nca_file = "{self.ready["ca"]}"\n'

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def pair(config: Path, code: str) -> None:
    subprocess.run([sys.executable, "-m", "appliance", "pair", code, "--config", str(config)], check=True,
                   capture_output=True)


async def until(predicate: Callable[[], Any]) -> None:
    """Poll ``predicate`` (another process's state) until it is true; the caller bounds it."""
    while not await predicate():  # noqa: ASYNC110  (polling another process; 0.1 s of granularity)
        await trio.sleep(0.1)


async def _steady(args: argparse.Namespace, root: Path, cloud: Cloud) -> dict[str, float]:
    sims = {d: DeviceSimulator(device_id=d, kind=k, key=device_key(d)) for d, k in DEVICES.items()}
    out: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        ports = {d: await nursery.start(partial(run_device_simulator, s, port=0, bind="127.0.0.1"))
                 for d, s in sims.items()}
        proc, bound, _log = await trio.to_thread.run_sync(lambda: start_box(
            root, list(ports.items()), cloud=cloud.section(), kinds=DEVICES, extra='[orders.routing]\n'
            'kds = ["order.created"]\nprinter = ["order.created"]\n'))
        try:
            await trio.to_thread.run_sync(pair, root / "appliance.toml", cloud.ready["pair_code"])
            api = f"http://127.0.0.1:{bound['api']}"
            wal = WalMeter(root / "state" / "appliance.db-wal")
            nursery.start_soon(wal.run)
            async with httpx.AsyncClient(base_url=api, headers=AUTH, timeout=30) as client:
                async def synced() -> bool:
                    return (await client.get("/v1/products/SKU-000001")).status_code == 200

                async def connected() -> bool:
                    return all(s.connections for s in sims.values())

                with trio.fail_after(300):
                    await until(synced)
                    await until(connected)
                await trio.sleep(5)  # the first pulls, heartbeats and pings settle

                ops = f"http://127.0.0.1:{bound['ops']}/metrics"

                async def commits() -> float:  # NaN from a box without the gauge (an older version)
                    text = (await client.get(ops)).text
                    return float(next((line.split()[1] for line in text.splitlines()
                                       if line.startswith("appliance_storage_commits ")), "nan"))

                def mark() -> tuple[int, int, float]:
                    wal.poll()
                    return write_bytes(proc.pid), wal.bytes, time.monotonic()

                b0, w0, t0 = mark()
                await trio.sleep(args.idle_seconds)
                b1, w1, t1 = mark()
                idle_rate, idle_wal_rate = (b1 - b0) / (t1 - t0), (w1 - w0) / (t1 - t0)
                out["idle_hour"] = idle_rate * 3600
                out["idle_hour_wal"] = idle_wal_rate * 3600

                for kind, count, make, path in (("sale", args.sales, sale, "/v1/sales"),
                                                ("order", args.orders, order, "/v1/orders")):
                    acked_before = sum(len(s.accepted) for s in sims.values())
                    c0 = await commits()
                    b0, w0, t0 = mark()
                    for n in range(count):
                        r = await client.post(path, json=make(n))
                        assert r.status_code == 201, r.text

                    async def uploaded(path: str = path, make: Callable[[int], dict[str, Any]] = make,
                                       count: int = count) -> bool:
                        for n in range(count):
                            r = await client.get(f"{path}/{make(n)['id']}")
                            if r.json()["upload"]["state"] != "accepted":
                                return False
                        return True

                    async def acked(kind: str = kind, count: int = count, before: int = acked_before) -> bool:
                        return kind != "order" or sum(len(s.accepted) for s in sims.values()) >= before + 3 * count

                    with trio.fail_after(300):
                        await until(uploaded)
                        await until(acked)
                    await trio.sleep(1.0)  # the last acks recorded
                    b1, w1, t1 = mark()
                    out[f"{kind}_commits"] = (await commits() - c0) / count
                    out[kind] = ((b1 - b0) - idle_rate * (t1 - t0)) / count
                    out[f"{kind}_wal"] = ((w1 - w0) - idle_wal_rate * (t1 - t0)) / count
        finally:
            proc.terminate()
            await trio.to_thread.run_sync(proc.wait)
        nursery.cancel_scope.cancel()
    out["sale_json"] = len(json.dumps(sale(0), separators=(",", ":")))
    return out


async def _snapshot(root: Path, cloud: Cloud, products: int) -> dict[str, float]:
    proc, bound, _log = await trio.to_thread.run_sync(lambda: start_box(root, [], cloud=cloud.section()))
    try:
        wal = WalMeter(root / "state" / "appliance.db-wal")
        b0 = write_bytes(proc.pid)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wal.run)
            await trio.to_thread.run_sync(pair, root / "appliance.toml", cloud.ready["pair_code"])
            last = f"/v1/products/SKU-{products:06d}"
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bound['api']}", headers=AUTH,
                                         timeout=30) as client:
                async def done() -> bool:
                    return (await client.get(last)).status_code == 200

                with trio.fail_after(900):
                    await until(done)
            await trio.sleep(1.0)
            wal.poll()
            nursery.cancel_scope.cancel()
        return {"snapshot": write_bytes(proc.pid) - b0, "snapshot_wal": wal.bytes,
                "db_file": (root / "state" / "appliance.db").stat().st_size}
    finally:
        proc.terminate()
        await trio.to_thread.run_sync(proc.wait)


def main(args: argparse.Namespace) -> None:
    assert TOKEN  # the box's admin token, for the sales and orders (devices sign instead)
    with tempfile.TemporaryDirectory(prefix="bench-writes-", dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
        root = Path(tmp)
        (root / "steady").mkdir()
        cloud = Cloud(root, 20)
        try:
            out = trio.run(_steady, args, root / "steady", cloud)
        finally:
            cloud.close()
        if args.snapshot_products:
            (root / "snap").mkdir()
            cloud = Cloud(root, args.snapshot_products)
            try:
                out |= trio.run(_snapshot, root / "snap", cloud, args.snapshot_products)
            finally:
                cloud.close()
    print(f"bytes written by the box (write_bytes of /proc/<pid>/io; WAL frames appended beside), idle "
          f"{args.idle_seconds:g} s, {args.sales} sales, {args.orders} orders to 3 devices")
    print(f"{'':38}{'written':>12}{'of it WAL':>12}{'goal':>10}{'vs goal':>9}")
    rows = [("per sale (stored, uploaded, acked)", out["sale"], out["sale_wal"], 32 * KiB),
            ("per order to 3 devices (+acks)", out["order"], out["order_wal"], None),
            ("per idle hour", out["idle_hour"], out["idle_hour_wal"], 5e6)]
    if "snapshot" in out:
        rows.append((f"per {args.snapshot_products:,}-product snapshot", out["snapshot"], out["snapshot_wal"], None))
    for name, total, wal, goal in rows:
        goal_text, ratio = (f"{goal / KiB:,.0f} KiB" if goal < 1e6 else f"{goal / 1e6:.0f} MB", f"{total / goal:.2f}") \
            if goal else ("", "")
        print(f"{name:38}{total / KiB:>10,.1f} K{wal / KiB:>10,.1f} K{goal_text:>10}{ratio:>9}")
    print(f"commits (whole box, idle ones included): {out['sale_commits']:.1f} per sale, "
          f"{out['order_commits']:.1f} per order")
    print(f"baseline: one sale's JSON is {out['sale_json']:.0f} bytes; per sale the box writes "
          f"{out['sale'] / out['sale_json']:.0f}x that")
    if "db_file" in out:
        print(f"database file after the snapshot: {out['db_file'] / 2**20:.1f} MiB")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench writes", description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--idle-seconds", type=float, default=120.0)
    p.add_argument("--sales", type=int, default=200)
    p.add_argument("--orders", type=int, default=50)
    p.add_argument("--snapshot-products", type=int, default=100_000)
    _cpus.add_option(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    _cpus.run(main, parse_args())
