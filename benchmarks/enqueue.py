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

And the listener's own code in process with no sockets (the connection wrapper, the HTTP
loop, the guard, the command route, the enqueue with its group commit and fsync):
``--in-flight`` connections each posting one command per request back to back, the
process's CPU per command (all threads) and the event loop's thread's share of it: the
same requests with no kernel sockets and no client beside it, the figure the machine's
other load moves least. Median of five rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Final

import httpx
import trio

from benchmarks import _cpus
from benchmarks._asgi import serve_fixed
from benchmarks._scripted import ScriptedConnection
from benchmarks.products import _free_port, _wait_port
from benchmarks.soak import AUTH, box_config, start_box

_POST = ("POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: " + AUTH["Authorization"] +
         "\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n")


def _request(path: str, body: dict[str, Any]) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode()
    return _POST.format(path=path, length=len(data)).encode() + data


class _Connection:
    """One keep-alive HTTP/1.1 connection to the box, opened again when the server closes it
    (hypercorn closes a connection after 1,000 requests)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stream: trio.SocketStream | None = None
        self.buffer = bytearray()

    async def post(self, request: bytes) -> tuple[int, bytes]:
        if self.stream is None:
            self.stream = await trio.open_tcp_stream("127.0.0.1", self.port)
            self.buffer.clear()
        await self.stream.send_all(request)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            self.buffer += await self._more()
        head = bytes(self.buffer[:end]).lower()
        del self.buffer[:end + 4]
        lines = head.split(b"\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in lines if line.startswith(b"content-length:")), 0)
        while len(self.buffer) < length:
            self.buffer += await self._more()
        body = bytes(self.buffer[:length])
        del self.buffer[:length]
        if b"connection: close" in lines:
            await self.aclose()
        return int(head.split(b" ", 2)[1]), body

    async def _more(self) -> bytes:
        assert self.stream is not None
        data = await self.stream.receive_some(65536)
        if not data:
            raise ConnectionError("the box closed the connection mid-answer")
        return data

    async def aclose(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()
            self.stream = None


async def _singles(port: int, seconds: float, workers: int, tag: str) -> int:
    """``workers`` connections, each posting one command per request, back to back."""
    done = 0
    deadline = trio.current_time() + seconds

    async def worker(w: int) -> None:
        nonlocal done
        connection = _Connection(port)
        n = 0
        try:
            while trio.current_time() < deadline:
                status, body = await connection.post(_request("/v1/devices/kds-1/commands", {
                    "kind": "print", "body": {"n": n}, "id": f"{tag}-{w}-{n}"}))
                assert status == 201, body
                n += 1
                done += 1
        finally:
            await connection.aclose()

    async with trio.open_nursery() as nursery:
        for w in range(workers):
            nursery.start_soon(worker, w)
    return done


async def _batches(port: int, seconds: float, size: int) -> int:
    done = n = 0
    deadline = trio.current_time() + seconds
    connection = _Connection(port)
    try:
        while trio.current_time() < deadline:
            lines = [{"device_id": "kds-1", "kind": "order.created", "body": {"line": k}, "id": f"batch-{n}-{k}"}
                     for k in range(size)]
            status, body = await connection.post(_request("/v1/commands", {"commands": lines}))
            assert status == 201, body
            done += size
            n += 1
    finally:
        await connection.aclose()
    return done


async def _commits(ops: str) -> float:
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"{ops}/metrics")).text
    return float(re.search(r"^appliance_storage_commits (\S+)$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]


def _cpu_s(pid: int) -> float:
    """The process's user + system CPU time so far (/proc/<pid>/stat), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _loop_cpu_s(pid: int) -> float:
    """The CPU time so far of the process's main thread (trio's event loop), in seconds.

    The rest of the process's CPU is its other threads': trio's workers (the writer's SQLite
    and fsync, reads sent to a thread), counted as the process's total less this. They are not
    told apart by name: trio names a worker thread after the job it runs at that moment, and
    an idle worker ends after a while (its CPU then leaves the per-thread files but stays in
    the process's), so counting them one by one gave negative shares."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _measure(port: int, ops: str, pid: int, args: argparse.Namespace) -> dict[str, tuple[float, ...]]:
    """Per way: (commands/s, commits per 1,000 commands, the box's CPU µs per command, of it
    the µs per command of its loop thread and of its other threads)."""
    out: dict[str, tuple[float, ...]] = {}
    await _singles(port, 0.5, 1, "warm")
    for name, way in (("baseline", lambda: _singles(port, args.seconds, 1, "seq")),
                      ("batch", lambda: _batches(port, args.seconds, args.batch)),
                      ("in flight", lambda: _singles(port, args.seconds, args.in_flight, "par"))):
        before, cpu, loop = await _commits(ops), _cpu_s(pid), _loop_cpu_s(pid)
        started = time.perf_counter()
        count = await way()
        elapsed = time.perf_counter() - started
        loop = _loop_cpu_s(pid) - loop
        cpu = _cpu_s(pid) - cpu
        out[name] = (count / elapsed, 1000 * (await _commits(ops) - before) / count, cpu / count * 1e6,
                     loop / count * 1e6, (cpu - loop) / count * 1e6)
    return out


async def _floor(port: int, pid: int, args: argparse.Namespace) -> tuple[float, float]:
    """The bare hypercorn server's (requests/s, CPU µs per request), the in-flight way."""
    await _singles(port, 0.5, 1, "warm")
    cpu = _cpu_s(pid)
    started = time.perf_counter()
    count = await _singles(port, args.seconds, args.in_flight, "floor")
    elapsed = time.perf_counter() - started
    return count / elapsed, (_cpu_s(pid) - cpu) / count * 1e6


async def _listener_us(config: Path, connections: int, requests: int = 400) -> tuple[float, float, float]:
    """The listener's own CPU per command in this process, no sockets: ``connections``
    scripted connections each posting ``requests`` commands one per request, served at once
    by the HTTP loop, the guard and the store API app as ``run_listener`` composes them
    (their enqueues group-committed as the box's are). Median of five rounds of (process CPU
    µs per command, the event loop thread's µs per command, commits per 1,000 commands)."""
    from appliance.config import load_config
    from appliance.services.assembly import listener_apps
    from appliance.services.h11_serving import IdleConnections, serve_h11
    from appliance.services.http import ConnectionCaps, _Connection, guarded_app, hypercorn_config
    from appliance.storage.devices import sync_declared
    from appliance.supervisor import open_runtime

    runtime = await open_runtime(load_config(str(config), env={})[0])
    try:
        await runtime.db.write(partial(sync_declared, declared=runtime.config.devices, now=time.time()))
        app = guarded_app(runtime, listener_apps(runtime)["api"], role="api")
        cfg = hypercorn_config(runtime)
        cfg.keep_alive_max_requests = requests + 1
        caps = ConnectionCaps(total=connections, per_source=connections)

        async def round_(tag: str, count: int) -> tuple[float, float, float]:
            streams = [ScriptedConnection([_request("/v1/devices/kds-1/commands", {
                "kind": "print", "body": {"n": n}, "id": f"{tag}-{c}-{n}"}) for n in range(count)],
                                          expect=b"HTTP/1.1 201 ") for c in range(connections)]
            commits = runtime.db.groups
            cpu, loop = time.process_time(), time.thread_time()
            async with trio.open_nursery() as nursery:
                for stream in streams:
                    caps.admit("bench")
                    nursery.start_soon(serve_h11, app, cfg, IdleConnections(), {},
                                       _Connection(stream, caps, "bench"))  # type: ignore[arg-type]
            cpu, loop = time.process_time() - cpu, time.thread_time() - loop
            done = sum(s.answers for s in streams)
            if done != connections * count:
                raise RuntimeError(f"{done} answers to {connections * count} requests")
            return cpu / done * 1e6, loop / done * 1e6, 1000 * (runtime.db.groups - commits) / done

        await round_("warm", 20)
        rounds = [await round_(f"r{r}", requests) for r in range(5)]
        return tuple(statistics.median(r[k] for r in rounds) for k in range(3))  # type: ignore[return-value]
    finally:
        runtime.db.close()


_ANSWER: Final = b'{"id":"c-0123456789abcdef01234567","device_id":"kds-1","seq":1,"state":"queued","created":true}'


def _serve_floor(port: int) -> None:
    """Reads the request's body and answers 201 with a command's answer: HTTP and nothing else."""
    serve_fixed(port, status=201, body=_ANSWER, read_body=True,
                headers=[(b"location", b"/v1/devices/kds-1/commands/c-0123456789abcdef01234567")])


def main(args: argparse.Namespace) -> None:
    with socket.socket() as closed:  # an address with nothing listening: commands stay queued
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
    floors = []
    for turn in ("before", "box", "after"):
        if turn == "box":
            with tempfile.TemporaryDirectory(prefix="bench-enqueue-") as tmp:
                proc, ports, _log = start_box(Path(tmp), [("kds-1", dead_port)])
                try:
                    result = trio.run(_measure, ports["api"], f"http://127.0.0.1:{ports['ops']}", proc.pid, args)
                finally:
                    proc.terminate()
                    proc.wait(10)
            continue
        # The HTTP floor, before and after the box so the machine's load falls on both alike.
        port = _free_port()
        hello = subprocess.Popen([sys.executable, "-m", "benchmarks.enqueue", "--floor", str(port)],
                                 stderr=subprocess.DEVNULL)
        try:
            trio.run(_wait_port, port)
            floors.append(trio.run(_floor, port, hello.pid, args))
        finally:
            hello.terminate()
            hello.wait(10)
    with tempfile.TemporaryDirectory(prefix="bench-enqueue-") as tmp:
        alone = trio.run(_listener_us, box_config(Path(tmp), [("kds-1", dead_port)]), args.in_flight)
    floor_rate = sum(f[0] for f in floors) / len(floors)
    floor_cpu = sum(f[1] for f in floors) / len(floors)
    base = result["baseline"][0]
    print(f"enqueue: one client, the real process on loopback, {args.seconds:g} s per way; durable on each answer")
    print(f"{'':40}{'commands/s':>12}{'vs baseline':>13}{'commits/1000 cmd':>18}{'box CPU us/cmd':>16}")
    labels = {"baseline": "baseline: 1 per request, 1 at once", "batch": f"batch: {args.batch} per request",
              "in flight": f"in flight: {args.in_flight} requests at once"}
    for name, (rate, commits, cpu_us, *_) in result.items():
        print(f"{labels[name]:40}{rate:>12,.0f}{rate / base:>12.1f}x{commits:>18.0f}{cpu_us:>16,.0f}")
    print(f"{'HTTP floor: bare hypercorn, ' + str(args.in_flight) + ' at once':40}{floor_rate:>12,.0f}"
          f"{floor_rate / base:>12.1f}x{'-':>18}{floor_cpu:>16,.0f}")
    rate, _, cpu_us, loop_us, threads_us = result["in flight"]
    print(f"in flight vs the HTTP floor (same client, same run): {rate / floor_rate:.2f}x requests/s, "
          f"{cpu_us / floor_cpu:.2f}x server CPU per request; goal >= 2,000 commands/s one per request: "
          f"{'met' if rate >= 2000 else 'not met'} ({rate:,.0f}/s)")
    print(f"in flight, the box's CPU per command by thread: event loop {loop_us:,.0f} us, its other threads "
          f"(trio's workers: the writer's SQLite and fsync) {threads_us:,.0f} us")
    print(f"listener in process ({args.in_flight} connections, no sockets; median of 5): {alone[0]:,.0f} us CPU per "
          f"command, of which the event loop's thread {alone[1]:,.0f} us; {alone[2]:.0f} commits/1000 cmd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench enqueue", description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--seconds", type=float, default=5.0, help="length of each way")
    p.add_argument("--batch", type=int, default=100, help="commands per POST /v1/commands")
    p.add_argument("--in-flight", type=int, default=16, help="requests outstanding at once")
    p.add_argument("--floor", type=int, metavar="PORT", help=argparse.SUPPRESS)  # serve the HTTP floor
    _cpus.add_option(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    options = parse_args()
    if options.floor:
        _serve_floor(options.floor)
    else:
        _cpus.run(main, options)
