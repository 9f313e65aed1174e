"""``GET /v1/products/{sku}`` on the store API under 50 concurrent keep-alive clients, next to
a bare hypercorn hello-world (same hypercorn, same trio worker) in the same run; the same
lookups signed by devices (docs/device-api.md) next to the admin bearer token, on the same
appliance process; the three take their rounds in turn. Requests are built before each measured window,
so the box's cost is measured, not the load generator's signing.

    python -m benchmarks.products [--clients 50] [--seconds 5] [--products 10000] [--cpus 1]

The appliance runs as ``python -m appliance run`` with a replica of N products; the
hello-world in its own process; the load generator (raw sockets, HTTP/1.1 keep-alive, one
trio task per client) in this one. Prints requests/s, p50 and p99 and the ratios, and each
server's CPU time per request (from /proc/<pid>/stat): on a shared machine the CPU ratio is
the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, Final

import trio

from benchmarks import _cpus
from benchmarks._asgi import serve_fixed

TOKEN = "bench-token-0123456789abcdef"
# Signed requests come from this many devices, as from a shop's tills and kiosks (one device
# would have to sign over 4,096 requests in one second to be refused: a flood, not a till).
DEVICES = 64
# Requests built before each measured window, per second of it: more than the box serves.
PREBUILT_PER_S = 4000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the servers ----------------------------------------------------------------------------


def _prepare_box(root: Path, products: int, port: int) -> Path:
    from appliance.storage import Database
    from appliance.storage.catalog import ReplicaWrite, apply_changes

    state = root / "state"
    db = Database.open_sync(state / "appliance.db")
    rng = random.Random(1)
    writes = [ReplicaWrite(entity="product", key=f"SKU-{i:06d}", seq=i, name=f"Product {i}", data=json.dumps({
        "sku": f"SKU-{i:06d}", "name": f"Product {i}", "category": rng.choice(["bakery", "snacks", "drinks"]),
        "tax_rate_bp": 550, "barcode": f"{2000000000000 + i}", "image": f"products/SKU-{i:06d}.jpg",
        "active": True})) for i in range(1, products + 1)]
    db.write_sync(partial(apply_changes, writes=writes, cursor=str(products), now=time.time()))
    db.close()
    config = root / "appliance.toml"
    ports = "\n".join(f"{r} = 0" for r in ("admin", "events", "media", "provisioning", "ops", "support", "discovery"))
    config.write_text(f'[lan]\nbind = "127.0.0.1"\n[lan.ports]\napi = {port}\n{ports}\n[storage]\ndir = "{state}"\n'
                      f'[admin]\ntoken = "{TOKEN}"\n[discovery]\nenabled = false\n[orders]\nenabled = false\n'
                      '[log]\nlevel = "warning"\n'
                      + "".join(f'[[devices]]\nid = "bench-pos-{i}"\nkind = "pos"\naddress = "127.0.0.1"\n'
                                f'port = 9\nkey = "{_device_key(i).hex()}"\n' for i in range(DEVICES)))
    return config


_HELLO: Final = (b'{"sku":"SKU-000001","name":"Product 1","category":"bakery","tax_rate_bp":550,'
                 b'"barcode":"2000000000001","image":"products/SKU-000001.jpg","active":true}')


def _serve_hello(port: int) -> None:
    serve_fixed(port, status=200, body=_HELLO, keep_alive_timeout=5.0)


# --- the load -----------------------------------------------------------------------------------


def _device_key(n: int) -> bytes:
    return bytes([n]) * 32


def _bearer(path: str, n: int) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()


def _signed(path: str, n: int) -> bytes:
    from appliance.protocol import identity as idp

    target, _, query = path.partition("?")
    device = n % DEVICES
    headers = idp.sign_request(_device_key(device), device_id=f"bench-pos-{device}", method="GET", path=target,
                               query=query, body=b"", created=int(time.time()), nonce=secrets.token_hex(16))
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{lines}\r\n".encode()


def _requests(path_of: Any, make: Any, ready: int) -> Iterator[bytes]:
    """``ready`` requests made before the clock starts (so the load generator's own signing
    is not what is measured: the box is), then more made as needed."""
    prebuilt = [make(path_of(), n) for n in range(ready)]
    yield from prebuilt
    n = ready
    while True:
        n += 1
        yield make(path_of(), n)


async def _client(port: int, requests: Iterator[bytes], until: float, warm_until: float,
                  latencies: list[float], *, served: list[int]) -> int:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    done = 0
    buffer = b""
    async with stream:
        while True:
            now = time.perf_counter()
            if now >= until:
                return done
            request = next(requests)
            await stream.send_all(request)
            while b"\r\n\r\n" not in buffer:
                buffer += await stream.receive_some(65536)
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            while len(buffer) < length:
                buffer += await stream.receive_some(65536)
            buffer = buffer[length:]
            if status != 200:
                raise RuntimeError(f"HTTP {status}")
            served[0] += 1
            if now >= warm_until:
                latencies.append(time.perf_counter() - now)
                done += 1


def _cpu_s(pid: int) -> float:
    """The process's user + system CPU time so far (/proc/<pid>/stat), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _load(port: int, paths: Any, clients: int, seconds: float, warmup: float, *,
                make: Any = _bearer, pid: int = 0) -> dict[str, float]:
    latencies: list[float] = []
    served = [0]
    requests = _requests(paths, make, int(PREBUILT_PER_S * (seconds + warmup)))
    next(requests)  # build the pool now, before the clock starts
    cpu_before = _cpu_s(pid) if pid else 0.0
    start = time.perf_counter()
    warm_until, until = start + warmup, start + warmup + seconds
    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(partial(_client, port, requests, until, warm_until, latencies, served=served))
    cpu = _cpu_s(pid) - cpu_before if pid else 0.0
    latencies.sort()
    return {"rps": len(latencies) / seconds, "p50_ms": latencies[len(latencies) // 2] * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000, "requests": len(latencies),
            "cpu_us": cpu / served[0] * 1e6}


async def _app_layer_us(config: Path, products: int, requests: int = 4000) -> dict[str, float]:
    """The store API app's own CPU time per ``GET /v1/products/{sku}``, with the bearer token
    and signed by a device, driven in this process with no sockets (no hypercorn, no guard):
    median of five alternating rounds each, in microseconds; plus h11's parse of each
    request's head (what the signature's three headers add before the app). Process CPU
    time, so steady when others share the machine: the figure to read for what a signature
    costs, which the loaded rounds' requests/s cannot resolve."""
    import h11

    from appliance.config import load_config
    from appliance.services.assembly import listener_apps
    from appliance.storage.devices import sync_declared
    from appliance.supervisor import open_runtime

    runtime = await open_runtime(load_config(str(config), env={})[0])
    try:
        # The declared devices (and their keys) enter the database when the box starts; this
        # in-process runtime does it here.
        await runtime.db.write(partial(sync_declared, declared=runtime.config.devices, now=time.time()))
        app = listener_apps(runtime)["api"]
        rng = random.Random(3)
        answers: list[Any] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Any) -> None:
            answers.append(message)

        def scope(raw: bytes) -> dict[str, Any]:
            head = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
            path = head[0].split(b" ")[1].decode()
            headers = [(k.strip().lower(), v.strip()) for k, _, v in (line.partition(b":") for line in head[1:])]
            return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                    "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                    "headers": headers, "client": ("127.0.0.1", 5), "server": ("127.0.0.1", 8000)}

        rounds: dict[str, list[float]] = {"bearer": [], "signed": [], "parse bearer": [], "parse signed": []}
        for _ in range(5):
            for label, make in (("bearer", _bearer), ("signed", _signed)):
                raws = [make(f"/v1/products/SKU-{rng.randint(1, products):06d}", n) for n in range(requests)]
                start = time.process_time()
                for raw in raws:
                    parser = h11.Connection(h11.SERVER)
                    parser.receive_data(raw)
                    parser.next_event()
                rounds[f"parse {label}"].append((time.process_time() - start) / requests * 1e6)
                scopes = [scope(raw) for raw in raws]
                start = time.process_time()
                for one in scopes:
                    await app(one, receive, send)
                    if answers[0]["status"] != 200:
                        raise RuntimeError(f"HTTP {answers[0]['status']}: {answers[1:]!r}")
                    answers.clear()
                rounds[label].append((time.process_time() - start) / requests * 1e6)
        return {label: sorted(values)[2] for label, values in rounds.items()}
    finally:
        runtime.db.close()


async def _wait_port(port: int) -> None:
    with trio.fail_after(30):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.products")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--products", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of each variant (box, signed, hello-world), alternating; medians")
    parser.add_argument("--hello", type=int, metavar="PORT", help=argparse.SUPPRESS)
    _cpus.add_option(parser)
    opts = parser.parse_args()
    if opts.hello:
        _serve_hello(opts.hello)
        return
    _cpus.run(_bench, opts)


def _bench(opts: argparse.Namespace) -> None:
    rng = random.Random(2)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        box_port, hello_port = _free_port(), _free_port()
        config = _prepare_box(root, opts.products, box_port)
        servers = {
            "appliance GET /v1/products/{sku}": (box_port, [sys.executable, "-m", "appliance", "run", "--config",
                                                            str(config)],
                                                 lambda: f"/v1/products/SKU-{rng.randint(1, opts.products):06d}"),
            "bare hypercorn hello-world": (hello_port, [sys.executable, "-m", "benchmarks.products", "--hello",
                                                        str(hello_port)], lambda: "/"),
        }
        # Both servers run for the whole benchmark and take their rounds in turn (hello-world,
        # the box with the bearer token, the box signed by a device), so that the machine's
        # load falls on every variant alike; each variant's median round is reported.
        procs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for _, argv, _ in servers.values()]
        try:
            for port, _, _ in servers.values():
                trio.run(_wait_port, port)
            signed_label = "  ... signed by a device"
            variants = [(name, port, paths, _bearer, proc.pid)
                        for (name, (port, _, paths)), proc in zip(servers.items(), procs, strict=True)]
            variants.insert(1, (signed_label, box_port, variants[0][2], _signed, procs[0].pid))
            rounds: dict[str, list[dict[str, float]]] = {label: [] for label, *_ in variants}
            for _ in range(opts.rounds):
                for label, port, paths, make, pid in variants:
                    rounds[label].append(trio.run(partial(_load, port, paths, opts.clients, opts.seconds,
                                                          opts.warmup, make=make, pid=pid)))
            for label, runs in rounds.items():
                results[label] = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(15)
    print(f"{opts.clients} concurrent keep-alive clients, {opts.seconds:g} s after {opts.warmup:g} s warm-up "
          f"(median of {opts.rounds} rounds per variant, the variants alternating; requests built beforehand):")
    for name, r in results.items():
        print(f"  {name:34} {r['rps']:8,.0f} req/s   p50 {r['p50_ms']:6.1f} ms   p99 {r['p99_ms']:6.1f} ms   "
              f"server CPU {r['cpu_us']:5.0f} us/request")
    box, signed, hello = results.values()
    with tempfile.TemporaryDirectory() as tmp:
        app_us = trio.run(_app_layer_us, _prepare_box(Path(tmp), opts.products, _free_port()), opts.products)
    print(f"  the store API app alone (in this process, no sockets): {app_us['bearer']:.0f} us CPU per request "
          f"(signed: {app_us['signed']:.0f} us); h11's parse of the head {app_us['parse bearer']:.0f} us "
          f"(signed: {app_us['parse signed']:.0f} us)")
    print(f"  ratio appliance / hello-world: {box['rps'] / hello['rps']:.2f}x requests/s, "
          f"{box['p99_ms'] / hello['p99_ms']:.1f}x p99")
    print(f"  ratio signed / bearer token:   {signed['rps'] / box['rps']:.2f}x requests/s, "
          f"{signed['p99_ms'] / box['p99_ms']:.1f}x p99")
    # The server's own CPU time per request: what bounds its throughput on a saturated core,
    # and far steadier than requests/s when others share the machine.
    print(f"  CPU-bound throughput ratio (hello-world CPU per request / appliance's): "
          f"{hello['cpu_us'] / box['cpu_us']:.2f}x; signed costs {signed['cpu_us'] / box['cpu_us'] - 1:+.0%} CPU "
          "per request over the bearer token (loaded rounds)")
    extra = app_us["signed"] - app_us["bearer"] + app_us["parse signed"] - app_us["parse bearer"]
    print(f"  a signature's own cost, measured alone: +{extra:.0f} us CPU per request (app + parse) = "
          f"{extra / box['cpu_us']:+.0%} of the box's CPU per request with the bearer token (goal: at most +15%)")


if __name__ == "__main__":
    main()
