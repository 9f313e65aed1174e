"""The hostile-LAN soak: good traffic and every attack at once, against the real process.

    scripts/soak [--minutes 30] [--report soak.json]

First the figures, each beside a baseline from the same run: ``/healthz`` p99 idle and
during 600 concurrent ``GET /``; ``/healthz`` on every listener with 1,100 slow connections
open; peak RSS with 50 concurrent bodies that parse into 170,000 objects; a device that
answers the WebSocket upgrade with a bare ``101`` for the whole run.

Then ``--minutes`` of mixed traffic: canary sales and orders posted without pause,
commands to three simulated devices, homepage and ``/health`` readers, and each minute
one round of attacks (slow connections, big bodies, a homepage crowd, JSON beyond bounds,
h2c, foreign Host values). Each minute: RSS, open descriptors and ``/healthz`` latency.
At the end: every canary sale and order is on the box, every command reached its device,
no service crashed, the process stops on SIGTERM with exit 0 and ``PRAGMA
integrity_check`` says ok. Prints a summary; ``--report`` writes it as JSON too.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from appliance.config import LISTENER_ROLES
from appliance.devkit.device import DeviceSimulator, read_log, run_device_simulator
from benchmarks import _cpus

TOKEN = "soak-admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DEVICES = 3
CROWD_S = 120.0


# --- the box and its devices -------------------------------------------------------------


def device_key(device_id: str) -> bytes:
    """The soak's pre-shared key of a simulated device ([[devices]] key)."""
    return hashlib.sha256(b"soak device key\x00" + device_id.encode()).digest()


def start_box(root: Path, devices: list[tuple[str, int]], *, token: str = TOKEN, extra: str = "",
              cloud: str = 'api_url = "https://127.0.0.1:9"\n',
              kinds: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], dict[str, int], Path]:
    """``python -m appliance run`` on loopback ports chosen by the kernel, with ``devices``
    declared (kind ``kds`` unless ``kinds`` says otherwise) and ``cloud`` as its [cloud]
    table; returns the process, the bound ports by role and its log file."""
    config = box_config(root, devices, token=token, extra=extra, cloud=cloud, kinds=kinds)
    log = root / "stderr.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config", str(config)], stderr=stderr)
    deadline = time.monotonic() + 60
    while not (found := re.search(r"ready: (.*)", log.read_text())):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the appliance did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)
    bound = {k: int(v) for k, v in (item.split("=") for item in found.group(1).strip().split(", "))}
    return proc, bound, log


def box_config(root: Path, devices: list[tuple[str, int]], *, token: str = TOKEN, extra: str = "",
               cloud: str = 'api_url = "https://127.0.0.1:9"\n', kinds: dict[str, str] | None = None) -> Path:
    """:func:`start_box`'s configuration file in ``root`` (every port 0), for a box started
    as a process or opened in this one."""
    ports = "\n".join(f"{r} = 0" for r in (*LISTENER_ROLES, "discovery"))
    declared = "".join(f'[[devices]]\nid = "{d}"\nkind = "{(kinds or {}).get(d, "kds")}"\n'
                       f'address = "127.0.0.1"\nport = {p}\n'
                       f'key = "{device_key(d).hex()}"\n' for d, p in devices)
    config = root / "appliance.toml"
    config.write_text(f'[lan]\nbind = "127.0.0.1"\n[lan.ports]\n{ports}\n[storage]\ndir = "{root / "state"}"\n'
                      f'[admin]\ntoken = "{token}"\n[discovery]\nenabled = false\n[orders]\nenabled = false\n'
                      f'[cloud]\n{cloud}[log]\nlevel = "info"\n'
                      f'[supervisor]\nshutdown_deadline_s = 3.0\n[dispatch]\nbackoff_max_s = 2.0\n{extra}{declared}')
    return config


async def bare_101_device(*, task_status: trio.TaskStatus[int]) -> None:
    """A "device" that answers the upgrade with a 101 and no Upgrade header, for ever."""

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(5):
                await stream.receive_some(65536)
                await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
                await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        task_status.started(listeners[0].socket.getsockname()[1])


# --- measuring -----------------------------------------------------------------------------


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    match = re.search(rf"{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else 0.0


def descriptors(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def healthz_latencies(ports: dict[str, int], rounds: int) -> list[float]:
    out: list[float] = []
    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(rounds):
            for role in LISTENER_ROLES:
                started = time.perf_counter()
                answer = await client.get(f"http://127.0.0.1:{ports[role]}/healthz")
                out.append(time.perf_counter() - started if answer.status_code == 200 else 10.0)
    return out


# --- the attacks -----------------------------------------------------------------------------


def open_slow_connections(ports: dict[str, int], count: int) -> list[socket.socket]:
    socks = []
    for n in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((f"127.0.0.{10 + n % 8}", 0))
        try:
            sock.connect(("127.0.0.1", ports[LISTENER_ROLES[n % len(LISTENER_ROLES)]]))
        except BlockingIOError:
            pass
        except OSError:
            sock.close()
            continue
        socks.append(sock)
    time.sleep(0.3)
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.send(b"POST /devices/action HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 9999\r\n")
    return socks


async def big_bodies(ports: dict[str, int], count: int) -> list[int]:
    body = b"[" + b"{}," * 170_000 + b"{}]"
    statuses: list[int] = []
    # Ten devices (addresses), five bodies each: all 50 arrive at once, under the per-address cap.
    clients = [httpx.AsyncClient(timeout=120, headers=AUTH, limits=httpx.Limits(max_connections=count),
                                 transport=httpx.AsyncHTTPTransport(local_address=f"127.0.2.{n}"))
               for n in range(1, 11)]

    async def one(n: int) -> None:
        try:
            answer = await clients[n % len(clients)].post(f"http://127.0.0.1:{ports['api']}/v1/sales", content=body,
                                                          headers={"content-type": "application/json"})
            statuses.append(answer.status_code)
        except httpx.HTTPError:
            statuses.append(0)

    async with trio.open_nursery() as nursery:
        for n in range(count):
            nursery.start_soon(one, n)
    for client in clients:
        await client.aclose()
    return statuses


_PROBE = """
import json, signal, sys, time, httpx
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background shell starts us with it ignored
out = []
try:
    with httpx.Client(timeout=10) as client:
        while True:
            started = time.perf_counter()
            try:
                client.get(f"http://127.0.0.1:{sys.argv[1]}/healthz")
                out.append(time.perf_counter() - started)
            except httpx.HTTPError:
                out.append(10.0)  # counted as the worst answer
            time.sleep(0.01)
except KeyboardInterrupt:
    print(json.dumps(out))
"""


async def homepage_crowd(ports: dict[str, int], count: int) -> tuple[list[float], list[float]]:
    """``count`` concurrent GET / (from several addresses) while /healthz is probed."""
    pages: list[float] = []
    probes: list[float] = []
    done = trio.Event()

    async def get(n: int) -> None:
        # Raw sockets, one request per connection, from 30 addresses (20 each at most).
        started = time.perf_counter()
        with trio.move_on_after(CROWD_S):
            sock = trio.socket.socket()
            try:
                await sock.bind((f"127.0.1.{1 + n % 30}", 0))
                await sock.connect(("127.0.0.1", ports["admin"]))
                stream = trio.SocketStream(sock)
                await stream.send_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                answer = b""
                while chunk := await stream.receive_some(65536):
                    answer += chunk
                if answer.startswith(b"HTTP/1.1 200"):
                    pages.append(time.perf_counter() - started)
            except (OSError, trio.BrokenResourceError):
                pass
            finally:
                sock.close()

    async def probe() -> None:
        # In a process of its own: the crowd's client must not slow the prober down.
        proc = await trio.lowlevel.open_process([sys.executable, "-c", _PROBE, str(ports["ops"])],
                                                stdout=subprocess.PIPE)
        assert proc.stdout is not None
        try:
            await done.wait()
            proc.send_signal(signal.SIGINT)
            out = b""
            while chunk := await proc.stdout.receive_some(65536):
                out += chunk
        finally:
            await proc.wait()
        probes.extend(json.loads(out or b"[]"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe)
        # The homepage answers 16 at a time per listener: a crowd takes a while; bounded here.
        with trio.move_on_after(CROWD_S):
            async with trio.open_nursery() as crowd:
                for n in range(count):
                    crowd.start_soon(get, n)
        done.set()
    return pages, probes


async def bad_requests(ports: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    async with httpx.AsyncClient(timeout=10, headers=AUTH) as client:
        sales = f"http://127.0.0.1:{ports['api']}/v1/sales"
        cases = {"deep": b"[" * 5000 + b"]" * 5000, "huge-int": b'{"total_cents": ' + b"9" * 5000 + b"}"}
        for name, body in cases.items():
            answer = await client.post(sales, content=body, headers={"content-type": "application/json"})
            out[name] = answer.status_code
        out["foreign-host"] = (await client.get(f"http://127.0.0.1:{ports['admin']}/",
                                                headers={"host": "rebind.example"})).status_code
    with socket.create_connection(("127.0.0.1", ports["api"]), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                     b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
        try:
            first = sock.recv(64)
        except OSError:
            first = b""
        out["h2c"] = 101 if first.startswith(b"HTTP/1.1 101") else 0
    return out


# --- good traffic ---------------------------------------------------------------------------


class Canary:
    def __init__(self, ports: dict[str, int], devices: list[str]) -> None:
        self.ports, self.devices = ports, devices
        self.sales: list[str] = []
        self.orders: list[str] = []
        self.commands: dict[str, list[str]] = {d: [] for d in devices}
        self.failures = 0

    async def run(self, until: float) -> None:
        n = 0
        async with httpx.AsyncClient(timeout=30, headers=AUTH) as client:
            api = f"http://127.0.0.1:{self.ports['api']}"
            while time.monotonic() < until:
                n += 1
                qty = 1 + n % 3
                lines = [{"sku": f"SKU-{n % 97:06d}", "qty": qty, "unit_price_cents": 250}]
                total = qty * 250
                sale = {"id": f"soak-sale-{n}", "device_id": "pos-1", "currency": "EUR", "total_cents": total,
                        "lines": lines, "payments": [{"method": "card", "amount_cents": total}]}
                order = {"id": f"soak-order-{n}", "device_id": "kiosk-1", "currency": "EUR", "total_cents": total,
                         "lines": lines}
                device = self.devices[n % len(self.devices)]
                command = {"kind": "print", "id": f"soak-cmd-{n}", "body": {"n": n}}
                for url, body, done in ((f"{api}/v1/sales", sale, self.sales), (f"{api}/v1/orders", order, self.orders),
                                        (f"{api}/v1/devices/{device}/commands", command, self.commands[device])):
                    try:
                        answer = await client.post(url, json=body)
                        if answer.status_code in (200, 201, 202):
                            done.append(body["id"])  # type: ignore[arg-type]
                        else:
                            self.failures += 1
                    except httpx.HTTPError:
                        self.failures += 1
                await trio.sleep(0.2)

    async def missing(self) -> dict[str, int]:
        lost = {"sales": 0, "orders": 0}
        async with httpx.AsyncClient(timeout=30, headers=AUTH) as client:
            api = f"http://127.0.0.1:{self.ports['api']}"
            for kind, ids in (("sales", self.sales), ("orders", self.orders)):
                for record_id in ids:
                    if (await client.get(f"{api}/v1/{kind}/{record_id}")).status_code != 200:
                        lost[kind] += 1
        return lost


# --- the run ---------------------------------------------------------------------------------


async def soak(minutes: float) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="appliance-soak-"))
    sims = {f"kds-{i}": DeviceSimulator(device_id=f"kds-{i}", log_path=root / f"kds-{i}.jsonl",
                                        key=device_key(f"kds-{i}")) for i in range(DEVICES)}
    report: dict[str, Any] = {"minutes": minutes}
    async with trio.open_nursery() as nursery:
        declared = [(d, await nursery.start(partial(run_device_simulator, sim, port=0, bind="127.0.0.1")))
                    for d, sim in sims.items()]
        declared.append(("bare-101", await nursery.start(bare_101_device)))
        proc, ports, log = start_box(root, declared)
        try:
            started = time.monotonic()
            # The figures, each beside its baseline.
            print("figures: homepage crowd", file=sys.stderr, flush=True)
            idle = await healthz_latencies(ports, 10)
            pages, probes = await homepage_crowd(ports, 600)
            await trio.sleep(6)  # the server closes connections whose clients left within keep_alive_timeout_s
            report["homepage_600"] = {"healthz_p99_idle_ms": round(p(idle, 0.99) * 1000, 1),
                                      "healthz_p99_during_ms": round(p(probes, 0.99) * 1000, 1),
                                      "pages_answered": len(pages), "page_p50_ms": round(p(pages, 0.5) * 1000)}
            print("figures: 1,100 slow connections", file=sys.stderr, flush=True)
            slow = open_slow_connections(ports, 1100)
            during = await healthz_latencies(ports, 3)
            report["slow_1100"] = {"open": len(slow), "healthz_max_ms": round(max(during) * 1000, 1),
                                   "healthz_max_idle_ms": round(max(idle) * 1000, 1)}
            for sock in slow:
                sock.close()
            await trio.sleep(6)
            print("figures: 50 big bodies", file=sys.stderr, flush=True)
            rss_before = rss_mb(proc.pid, "VmHWM")
            statuses = await big_bodies(ports, 50)
            report["bodies_50"] = {"peak_rss_mb_before": round(rss_before),
                                   "peak_rss_mb": round(rss_mb(proc.pid, "VmHWM")),
                                   "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))}}
            # The soak.
            print("soak: mixed traffic and attacks", file=sys.stderr, flush=True)
            canary = Canary(ports, list(sims))
            until = time.monotonic() + minutes * 60
            samples: list[dict[str, Any]] = []
            async with trio.open_nursery() as traffic:
                traffic.start_soon(canary.run, until)
                minute = 0
                while time.monotonic() < until:
                    minute += 1
                    round_started = time.monotonic()
                    slow = open_slow_connections(ports, 300)
                    bad = await bad_requests(ports)
                    await big_bodies(ports, 20)
                    crowd, _ = await homepage_crowd(ports, 200)
                    lat = await healthz_latencies(ports, 5)
                    for sock in slow:
                        sock.close()
                    samples.append({"minute": minute, "rss_mb": round(rss_mb(proc.pid)), "fds": descriptors(proc.pid),
                                    "healthz_p50_ms": round(statistics.median(lat) * 1000, 1),
                                    "healthz_p99_ms": round(p(lat, 0.99) * 1000, 1), "bad": bad,
                                    "homepage_answered": len(crowd), "alive": proc.poll() is None})
                    print(json.dumps(samples[-1]), flush=True)
                    await trio.sleep(max(0.0, 60 - (time.monotonic() - round_started)))
            report["samples"] = samples
            report["canary"] = {"sales": len(canary.sales), "orders": len(canary.orders),
                                "commands": sum(len(v) for v in canary.commands.values()),
                                "refused_or_failed_posts": canary.failures, "missing": await canary.missing()}
            with trio.fail_after(120):
                while any(len(read_log(root / f"{d}.jsonl")) < len(ids)  # noqa: ASYNC110
                          for d, ids in canary.commands.items()):
                    await trio.sleep(0.5)
            delivered = {d: {a.id for a in read_log(root / f"{d}.jsonl")} for d in sims}
            report["canary"]["commands_undelivered"] = sum(len(set(ids) - delivered[d])
                                                           for d, ids in canary.commands.items())
            async with httpx.AsyncClient(timeout=10) as client:
                services = (await client.get(f"http://127.0.0.1:{ports['admin']}/api/status")).json()["services"]
            report["services"] = {s["name"]: f"{s['state']} ({s['crashes']} crashes)" for s in services}
            report["elapsed_min"] = round((time.monotonic() - started) / 60, 1)
        finally:
            proc.send_signal(signal.SIGTERM)
            report["exit_code"] = proc.wait(30)
            nursery.cancel_scope.cancel()
    for sim in sims.values():
        sim.close()
    with sqlite3.connect(root / "state" / "appliance.db") as conn:
        report["integrity_check"] = conn.execute("PRAGMA integrity_check").fetchone()[0]
    report["log_bytes"] = log.stat().st_size
    report["tracebacks_in_log"] = log.read_text(errors="replace").count("Traceback")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--report", type=Path, help="write the summary as JSON here too")
    _cpus.add_option(parser)
    args = parser.parse_args()
    report = trio.run(soak, args.minutes)
    summary = {k: v for k, v in report.items() if k != "samples"}
    samples = report.get("samples", [])
    if samples:
        summary["rss_mb_first_last_max"] = [samples[0]["rss_mb"], samples[-1]["rss_mb"],
                                            max(s["rss_mb"] for s in samples)]
        summary["fds_first_last_max"] = [samples[0]["fds"], samples[-1]["fds"], max(s["fds"] for s in samples)]
        summary["healthz_p99_ms_max"] = max(s["healthz_p99_ms"] for s in samples)
    print(json.dumps(summary, indent=2))
    if args.report:
        args.report.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    _cpus.run_main(main)
