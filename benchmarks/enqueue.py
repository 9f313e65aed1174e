"""Enqueue: one client posting device commands back to back to the real process, durable on each answer.

``python -m appliance run`` on loopback with one declared device (nothing listens at its
address, so every command stays queued and only the enqueue is measured). One client,
three ways, each for ``--seconds``:

- baseline: one command per request, one request at a time (each answer waits for its
  own commit and fsync: what a client got before group commit, and still gets this way);
- batch: ``POST /v1/commands`` with ``--batch`` commands per request, one at a time;
- in flight: one command per request, ``--in-flight`` requests outstanding at once on as
  many connections (requests in the same millisecond share a commit).

Every command counted was answered 201, which the box sends only after the commit.
"""

from __future__ import annotations

import argparse
import re
import socket
import tempfile
import time
from pathlib import Path

import httpx
import trio

from benchmarks import _cpus
from benchmarks.soak import AUTH, start_box


async def _singles(client: httpx.AsyncClient, seconds: float, workers: int, tag: str) -> int:
    done = 0
    deadline = trio.current_time() + seconds

    async def worker(w: int) -> None:
        nonlocal done
        n = 0
        while trio.current_time() < deadline:
            r = await client.post("/v1/devices/kds-1/commands",
                                  json={"kind": "print", "body": {"n": n}, "id": f"{tag}-{w}-{n}"})
            assert r.status_code == 201, r.text
            n += 1
            done += 1

    async with trio.open_nursery() as nursery:
        for w in range(workers):
            nursery.start_soon(worker, w)
    return done


async def _batches(client: httpx.AsyncClient, seconds: float, size: int) -> int:
    done = n = 0
    deadline = trio.current_time() + seconds
    while trio.current_time() < deadline:
        lines = [{"device_id": "kds-1", "kind": "order.created", "body": {"line": k}, "id": f"batch-{n}-{k}"}
                 for k in range(size)]
        r = await client.post("/v1/commands", json={"commands": lines})
        assert r.status_code == 201, r.text
        done += size
        n += 1
    return done


async def _commits(ops: str) -> float:
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"{ops}/metrics")).text
    return float(re.search(r"^appliance_storage_commits (\S+)$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]


async def _measure(api: str, ops: str, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """Per way: (commands/s, commits per 1,000 commands)."""
    out: dict[str, tuple[float, float]] = {}
    limits = httpx.Limits(max_connections=args.in_flight, max_keepalive_connections=args.in_flight)
    async with httpx.AsyncClient(base_url=api, headers=AUTH, timeout=30, limits=limits) as client:
        await _singles(client, 0.5, 1, "warm")
        for name, way in (("baseline", lambda: _singles(client, args.seconds, 1, "seq")),
                          ("batch", lambda: _batches(client, args.seconds, args.batch)),
                          ("in flight", lambda: _singles(client, args.seconds, args.in_flight, "par"))):
            before = await _commits(ops)
            started = time.perf_counter()
            count = await way()
            elapsed = time.perf_counter() - started
            out[name] = (count / elapsed, 1000 * (await _commits(ops) - before) / count)
    return out


def main(args: argparse.Namespace) -> None:
    with socket.socket() as closed:  # an address with nothing listening: commands stay queued
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="bench-enqueue-") as tmp:
        proc, ports, _log = start_box(Path(tmp), [("kds-1", dead_port)])
        try:
            result = trio.run(_measure, f"http://127.0.0.1:{ports['api']}", f"http://127.0.0.1:{ports['ops']}", args)
        finally:
            proc.terminate()
            proc.wait(10)
    base = result["baseline"][0]
    print(f"enqueue: one client, the real process on loopback, {args.seconds:g} s per way; durable on each answer")
    print(f"{'':34}{'commands/s':>12}{'vs baseline':>13}{'commits/1000 cmd':>18}")
    labels = {"baseline": "baseline: 1 per request, 1 at once", "batch": f"batch: {args.batch} per request",
              "in flight": f"in flight: {args.in_flight} requests at once"}
    for name, (rate, commits) in result.items():
        print(f"{labels[name]:34}{rate:>12,.0f}{rate / base:>12.1f}x{commits:>18.0f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench enqueue", description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--seconds", type=float, default=5.0, help="length of each way")
    p.add_argument("--batch", type=int, default=100, help="commands per POST /v1/commands")
    p.add_argument("--in-flight", type=int, default=16, help="requests outstanding at once")
    _cpus.add_option(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    _cpus.run(main, parse_args())
