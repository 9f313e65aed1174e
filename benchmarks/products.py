"""``GET /v1/products/{sku}`` on the store API under 50 concurrent keep-alive clients, next to
a bare hypercorn hello-world (same hypercorn, same trio worker) in the same run; the same
lookups signed by devices (docs/device-api.md) next to the admin bearer token, on the same
appliance process; the three take their rounds in turn.

    python -m benchmarks.products [--clients 50] [--seconds 5] [--products 10000] [--cpus 1]

The appliance runs as ``python -m appliance run`` with a replica of N products; the
hello-world in its own process; the load generator (raw sockets, HTTP/1.1 keep-alive, one
trio task per client) in this one. Prints requests/s, p50 and p99 and the ratios, and each
server's CPU time per request (from /proc/<pid>/stat): on a shared machine the CPU ratio is
the steadier figure.

What a signature costs, end to end, is the box's own CPU time per signed request next to
the same with the bearer token, from the box's /proc/<pid>/stat only (the load generator's
CPU is its own process's, printed beside it so that a difference there shows):

- every request a round needs is built (and signed) before its clock starts, none during
  it (any built late are counted and printed), so the signing is not the box's cost and
  does not slow the clients;
- the devices' keys are in the box's cache before the first round (a device's first
  request reads its key once; a shop's devices are known long before a rush);
- in pairs of short rounds in turn (bearer then signed, signed then bearer, ...), each
  pair's ratio taken and the median printed with the range: a drift of the machine's other
  load falls on both halves of a pair alike (with one round of each a minute apart, the
  ratio swung by 15 points between runs here);
- at full load (clients as fast as the box answers) and again at the same offered rate
  below both maxima (paced clients), where the box's batching per wake-up is alike;
- and the listener's own code in process with no sockets (the connection wrapper, the
  guard, the HTTP loop, the app; process CPU time): the same requests with no kernel and
  no other load, the figure the machine's load moves least.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Final

import trio

from benchmarks import _cpus
from benchmarks._asgi import serve_fixed
from benchmarks._scripted import ScriptedConnection

TOKEN = "bench-token-0123456789abcdef"
# Signed requests come from this many devices, as from a shop's tills and kiosks (one device
# would have to sign over 4,096 requests in one second to be refused: a flood, not a till).
DEVICES = 64
# Requests built before each measured window, per second of it: more than the box serves
# here (5,000/s with the bearer token on a quiet machine); any built late are counted.
PREBUILT_PER_S = 8000
# The paced rounds offer this share of the signed requests' full-load rate: below both
# maxima, so that bearer and signed meet the same rate and the same batching.
PACED_SHARE = 0.6
# Pairs of short rounds (bearer and signed in turn) for the signed-vs-bearer ratios.
PAIRS = 6
PAIR_SECONDS = 2.0


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


class _Requests:
    """``ready`` requests made before the clock starts (so the load generator's own signing
    is not what is measured: the box is), then more made as needed, counted in ``late``."""

    def __init__(self, path_of: Any, make: Any, ready: int) -> None:
        self._path_of, self._make = path_of, make
        self._prebuilt = iter([make(path_of(), n) for n in range(ready)])
        self._n = ready
        self.late = 0

    def __next__(self) -> bytes:
        request = next(self._prebuilt, None)
        if request is None:
            self._n += 1
            self.late += 1
            request = self._make(self._path_of(), self._n)
        return request


async def _client(port: int, requests: _Requests, until: float, warm_until: float,
                  latencies: list[float], *, served: list[int], interval: float = 0.0) -> int:
    """One keep-alive client: a request, its answer, the next; with ``interval``, one request
    every ``interval`` seconds at most (paced), else as fast as the box answers."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    done = 0
    buffer = b""
    due = time.perf_counter() + random.random() * interval
    async with stream:
        while True:
            now = time.perf_counter()
            if now >= until:
                return done
            if interval:
                if due > now:
                    await trio.sleep(due - now)
                    now = time.perf_counter()
                due += interval
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


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _load(port: int, paths: Any, clients: int, seconds: float, warmup: float, *,
                make: Any = _bearer, pid: int = 0, rate: float = 0.0) -> dict[str, float]:
    """One round: ``clients`` clients for ``warmup`` + ``seconds``, at full speed or (``rate``)
    paced to that many requests/s in all."""
    latencies: list[float] = []
    served = [0]
    requests = _Requests(paths, make, int((rate * 1.2 or PREBUILT_PER_S) * (seconds + warmup)))
    cpu_before, own_before = _cpu_s(pid) if pid else 0.0, _own_cpu_s()
    start = time.perf_counter()
    warm_until, until = start + warmup, start + warmup + seconds
    interval = clients / rate if rate else 0.0
    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(partial(_client, port, requests, until, warm_until, latencies, served=served,
                                       interval=interval))
    cpu = _cpu_s(pid) - cpu_before if pid else 0.0
    latencies.sort()
    return {"rps": len(latencies) / seconds, "p50_ms": latencies[len(latencies) // 2] * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000, "requests": len(latencies),
            "cpu_us": cpu / served[0] * 1e6, "client_us": (_own_cpu_s() - own_before) / served[0] * 1e6,
            "late": requests.late}


async def _listener_us(config: Path, products: int, requests: int = 4000) -> dict[str, float]:
    """The store API listener's own CPU time per ``GET /v1/products/{sku}``, with the bearer
    token and signed by a device, in this process with no sockets: each connection's
    wrapper (the HTTP/2 refusal), the HTTP/1.1 loop on h11, the guard and the app, as
    ``run_listener`` composes them. Median of five alternating rounds each, process CPU time
    in microseconds: steady when others share the machine. Signed requests are checked by
    the check the box uses ("signed") and, when that is the native one, also by the Python
    one ("signed, python check") in rounds of their own, for comparison."""
    from appliance.config import load_config
    from appliance.protocol import sigcheck
    from appliance.services.assembly import listener_apps
    from appliance.services.h11_serving import IdleConnections, serve_h11
    from appliance.services.http import ConnectionCaps, _Connection, guarded_app, hypercorn_config
    from appliance.storage.devices import sync_declared
    from appliance.supervisor import open_runtime

    runtime = await open_runtime(load_config(str(config), env={})[0])
    try:
        # The declared devices (and their keys) enter the database and the key ring when the
        # box starts; this in-process runtime does it here.
        await runtime.db.write(partial(sync_declared, declared=runtime.config.devices, now=time.time()))
        runtime.keys.set_declared({d.id: d.key for d in runtime.config.devices})
        app = guarded_app(runtime, listener_apps(runtime)["api"], role="api")
        cfg = hypercorn_config(runtime)
        cfg.keep_alive_max_requests = requests + DEVICES
        caps = ConnectionCaps(total=10, per_source=10)
        rng = random.Random(3)

        async def serve(raws: list[bytes]) -> float:
            stream = ScriptedConnection(raws, expect=b"HTTP/1.1 200 ")
            caps.admit("bench")
            start = time.process_time()
            await serve_h11(app, cfg, IdleConnections(), {}, _Connection(stream, caps, "bench"))  # type: ignore[arg-type]
            elapsed = time.process_time() - start
            if stream.answers != len(raws):
                raise RuntimeError(f"{stream.answers} answers to {len(raws)} requests")
            return elapsed / len(raws) * 1e6

        checks = {"signed": runtime.keys.check}
        if runtime.keys.check is not sigcheck.PYTHON:
            checks["signed, python check"] = sigcheck.PYTHON
        rounds: dict[str, list[float]] = {"bearer": [], **{label: [] for label in checks}}
        for n in range(5):
            for label in list(rounds)[::1 if n % 2 == 0 else -1]:
                if label in checks and runtime.keys.check is not checks[label]:
                    runtime.keys.check = checks[label]
                    runtime.keys.forget()  # (the keys made again by this check, before the round)
                if label in checks and runtime.keys.cached("bench-pos-0") is None:
                    await serve([_signed(f"/v1/products/SKU-{n + 1:06d}", n) for n in range(DEVICES)])
                make = _bearer if label == "bearer" else _signed
                rounds[label].append(await serve([make(f"/v1/products/SKU-{rng.randint(1, products):06d}", n)
                                                  for n in range(requests)]))
        return {label: sorted(values)[2] for label, values in rounds.items()}
    finally:
        runtime.db.close()


async def _warm_keys(port: int) -> None:
    """One signed request from each device, so that the rounds meet their keys cached. The
    box declares its devices just after its listeners open: until then a device is unknown
    (401), so each is retried for a few seconds."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        with trio.fail_after(10):
            for n in range(DEVICES):
                while True:
                    await stream.send_all(_signed("/v1/products/SKU-000001", n))
                    head = b""
                    while b"\r\n\r\n" not in head:
                        head += await stream.receive_some(65536)
                    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:"))
                    rest = head.partition(b"\r\n\r\n")[2]
                    while len(rest) < length:
                        rest += await stream.receive_some(65536)
                    if head.startswith(b"HTTP/1.1 200 "):
                        break
                    await trio.sleep(0.1)


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
    parser.add_argument("--pairs", type=int, default=PAIRS,
                        help="pairs of short bearer/signed rounds for the signature's cost, each way (full, paced)")
    parser.add_argument("--pair-seconds", type=float, default=PAIR_SECONDS)
    parser.add_argument("--hello", type=int, metavar="PORT", help=argparse.SUPPRESS)
    _cpus.add_option(parser)
    opts = parser.parse_args()
    if opts.hello:
        _serve_hello(opts.hello)
        return
    _cpus.run(_bench, opts)


def _bench(opts: argparse.Namespace) -> None:
    from appliance.protocol import sigcheck

    # The box (a child with this environment and this Python) makes the same choice.
    check, why = sigcheck.choose(os.environ)
    rng = random.Random(2)
    results: dict[str, dict[str, float]] = {}
    full_pairs: list[dict[str, dict[str, float]]] = []
    paced_pairs: list[dict[str, dict[str, float]]] = []
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
            trio.run(_warm_keys, box_port)
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
            # Bearer and signed in pairs of short rounds, at full load and then both paced to
            # one rate below both maxima; the order within a pair alternates.
            rate = PACED_SHARE * results[signed_label]["rps"]
            for offered, pairs in ((0.0, full_pairs), (rate, paced_pairs)):
                for n in range(opts.pairs):
                    pair = {}
                    for label, make in (("bearer", _bearer), ("signed", _signed))[::1 if n % 2 == 0 else -1]:
                        pair[label] = trio.run(partial(_load, box_port, variants[0][2], opts.clients,
                                                       opts.pair_seconds, 0.5, make=make, pid=procs[0].pid,
                                                       rate=offered))
                    pairs.append(pair)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(15)
    print(f"{opts.clients} concurrent keep-alive clients, {opts.seconds:g} s after {opts.warmup:g} s warm-up "
          f"(median of {opts.rounds} rounds per variant, the variants alternating; every request built before its "
          "round's clock):")
    for name, r in results.items():
        print(f"  {name:34} {r['rps']:8,.0f} req/s   p50 {r['p50_ms']:6.1f} ms   p99 {r['p99_ms']:6.1f} ms   "
              f"server CPU {r['cpu_us']:5.0f} us/request   (load generator {r['client_us']:3.0f} us/request)")
    late = sum(r["late"] for runs in rounds.values() for r in runs) + \
        sum(r["late"] for pair in (*full_pairs, *paced_pairs) for r in pair.values())
    if late:
        print(f"  NOTE: {late:,.0f} requests were built during the rounds (the prebuilt ones ran out): raise "
              "PREBUILT_PER_S")
    box, _, hello = results.values()
    print(f"  ratio appliance / hello-world: {box['rps'] / hello['rps']:.2f}x requests/s, "
          f"{box['p99_ms'] / hello['p99_ms']:.1f}x p99")
    # The server's own CPU time per request: what bounds its throughput on a saturated core,
    # and far steadier than requests/s when others share the machine.
    print(f"  CPU-bound throughput ratio (hello-world CPU per request / appliance's): "
          f"{hello['cpu_us'] / box['cpu_us']:.2f}x")
    with tempfile.TemporaryDirectory() as tmp:
        alone = trio.run(_listener_us, _prepare_box(Path(tmp), opts.products, _free_port()), opts.products)
    print(f"  signed by a device vs the bearer token (goal: at most +15% CPU per request), signatures checked by "
          f"the {check.name} check ({why}): the box's own CPU time "
          "per request (its /proc/<pid>/stat; the load generator's is its own), the devices' keys already cached, "
          f"every request signed before its round; {opts.pairs} pairs of {opts.pair_seconds:g} s rounds in turn, "
          "the median of the pairs' ratios (range):")
    for what, pairs in (("at full load", full_pairs), (f"paced, both at {rate:,.0f} req/s", paced_pairs)):
        cpu = _spread([p["signed"]["cpu_us"] / p["bearer"]["cpu_us"] - 1 for p in pairs])
        rps = _spread([p["signed"]["rps"] / p["bearer"]["rps"] for p in pairs])
        signed_us = statistics.median(p["signed"]["cpu_us"] for p in pairs)
        bearer_us = statistics.median(p["bearer"]["cpu_us"] for p in pairs)
        print(f"    {what:30} {cpu[0]:+4.0%} ({cpu[1]:+.0%} .. {cpu[2]:+.0%})   "
              f"{signed_us:4.0f} vs {bearer_us:4.0f} us   "
              f"requests/s signed/bearer {rps[0]:.2f}x ({rps[1]:.2f} .. {rps[2]:.2f})")
    extra = alone["signed"] - alone["bearer"]
    print(f"    {'the listener in process':30} {alone['signed'] / alone['bearer'] - 1:+4.0%}   "
          f"{alone['signed']:4.0f} vs {alone['bearer']:4.0f} us   (no sockets: the connection wrapper, the HTTP loop, "
          "the guard and the app; process CPU, median of 5): "
          f"+{extra:.0f} us, {extra / box['cpu_us']:+.0%} of the box's whole CPU per bearer request above")
    if "signed, python check" in alone:
        extra = alone["signed, python check"] - alone["bearer"]
        print(f"    {'... with the Python check':30} {alone['signed, python check'] / alone['bearer'] - 1:+4.0%}   "
              f"{alone['signed, python check']:4.0f} vs {alone['bearer']:4.0f} us   (the same rounds, interleaved): "
              f"+{extra:.0f} us")


def _spread(values: list[float]) -> tuple[float, float, float]:
    """Median, lowest and highest."""
    return statistics.median(values), min(values), max(values)


if __name__ == "__main__":
    main()
