"""Event stream: fan-out of a burst to many subscribers, the log on 8001 vs a raw WebSocket broadcast.

Both phases deliver the same messages (``--events`` of them, default 10,000) to the same
subscribers (``--subscribers``, default 200), which run in a separate process on loopback
so their own cost is not charged to the event loop being measured:

- baseline: raw trio-websocket, one server connection per subscriber, each fed by its own
  writer task; the burst is handed to every connection as fast as it can take it. No
  storage, no HTTP server: what the network and the subscribers cost by themselves.
- events: a whole appliance (every service) in this process; the burst is committed to
  the event log in transactions of ``--batch`` events (each one durable, as sync pages
  are), and the subscribers follow ``ws://127.0.0.1:<events>/v1/events``.

Every message carries the wall-clock time just before its commit (so the commit's fsync
is counted; baseline: before it is handed over); a subscriber records when it arrived.
Printed: deliveries/s (messages times subscribers, from the first commit to the last
arrival) and write-to-delivery p50 and p99, and their ratio. A burst committed as fast
as possible is delivered at the subscribers' pace, so its latency is its drain time; a
paced phase (``--rate`` events/s) gives the latency a device sees, and the box's own
figure from commit to each subscriber's connection taking the event. Goal: at least
0.5x the raw throughput and p99 under 100 ms at 200 subscribers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio
import trio.lowlevel
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, open_websocket_url, serve_websocket

from appliance.config import parse_config
from appliance.services.assembly import service_specs
from appliance.storage.event_log import append
from appliance.supervisor import open_runtime, supervise_all
from benchmarks import _cpus

# --- the subscribers (a child process) ---------------------------------------------------


async def subscribe(url: str, *, count: int, expect: int, ready: trio.Event, connected: list[int],
                    latencies: list[float], done: list[float], resumes: list[int]) -> None:
    """One subscriber, as a device would be written: told it is too slow, it reconnects
    from the last id it got (the stream sends what it missed first)."""
    last = 0  # the last id got: a resumed stream starts after it
    got: set[int] = set()  # which of the burst's messages arrived (ids also count the box's own events)
    first = True
    while len(got) < expect:
        target = url if first else f"{url}&after={last}"
        try:
            async with open_websocket_url(target, message_queue_size=4096, max_message_size=1 << 22) as ws:
                if first:
                    first = False
                    connected[0] += 1
                    if connected[0] == count:
                        ready.set()
                while len(got) < expect:
                    decoded = json.loads(await ws.get_message())
                    arrived = time.time()
                    for message in decoded if isinstance(decoded, list) else [decoded]:
                        data = message.get("data")
                        if isinstance(data, dict) and "t" in data:
                            last = max(last, message["id"])
                            if data["n"] not in got:
                                got.add(data["n"])
                                latencies.append(arrived - data["t"])
                        elif message.get("type") == "ping":
                            await ws.send_message('{"op":"pong"}')
        except ConnectionClosed:
            resumes[0] += 1
    done.append(time.time())


async def subscribers_main(url: str, count: int, expect: int) -> None:
    latencies: list[float] = []
    done: list[float] = []
    ready = trio.Event()
    connected = [0]
    resumes = [0]
    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(partial(subscribe, url, count=count, expect=expect, ready=ready, connected=connected,
                                       latencies=latencies, done=done, resumes=resumes))
        await ready.wait()
        print("ready", flush=True)
    latencies.sort()
    print(json.dumps({"last": max(done), "n": len(latencies), "p50": latencies[len(latencies) // 2],
                      "p99": latencies[int(len(latencies) * 0.99)], "resumes": resumes[0]}), flush=True)


def start_subscribers(url: str, count: int, expect: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.events", "--child", url, str(count), str(expect)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise SystemExit(f"subscribers did not start: {line!r}")
    return proc


def finish(proc: subprocess.Popen[str], started: float, events: int, subscribers: int) -> dict[str, float]:
    assert proc.stdout is not None
    out = json.loads(proc.stdout.readline())
    proc.wait(timeout=60)
    elapsed = out["last"] - started
    assert out["n"] == events * subscribers, out
    return {"per_s": events * subscribers / elapsed, "elapsed_s": elapsed, "p50_ms": out["p50"] * 1000,
            "p99_ms": out["p99"] * 1000, "resumes": out["resumes"]}


def message(i: int) -> dict[str, Any]:
    return {"n": i, "sku": f"SKU-{i:06d}", "price": {"amount_cents": 100 + i % 900, "currency": "EUR"}}


# --- baseline: raw trio-websocket broadcast -----------------------------------------------


async def baseline(events: int, subscribers: int, batch: int, packed: bool, rate: float = 0.0) -> dict[str, float]:
    """``packed``: each commit's worth of messages goes as one JSON array (as the log's
    stream does for a subscriber that asks for ``coalesce=1``), else one message each."""
    queues: list[trio.MemorySendChannel[str]] = []
    all_in = trio.Event()

    async def handler(request: WebSocketRequest) -> None:
        ws: WebSocketConnection = await request.accept()
        send, receive = trio.open_memory_channel[str](events + 16)
        queues.append(send)
        if len(queues) == subscribers:
            all_in.set()
        async for text in receive:
            await ws.send_message(text)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve_websocket, handler, "127.0.0.1", 0, ssl_context=None))
        port = server.port
        proc = await trio.to_thread.run_sync(start_subscribers, f"ws://127.0.0.1:{port}/", subscribers, events)
        await all_in.wait()
        started, clock = time.time(), trio.current_time()
        for k, first in enumerate(range(0, events, batch)):
            if rate:
                await trio.sleep_until(clock + k * batch / rate)
            texts = [json.dumps({"id": i + 1, "type": "price.changed", "topic": "catalog",
                                 "at": "2026-11-29T18:00:00.000Z", "data": {**message(i), "t": time.time()}},
                                separators=(",", ":")) for i in range(first, min(events, first + batch))]
            for text in ["[" + ",".join(texts) + "]"] if packed else texts:
                for q in queues:
                    q.send_nowait(text)
            await trio.lowlevel.checkpoint()
        result = await trio.to_thread.run_sync(finish, proc, started, events, subscribers)
        nursery.cancel_scope.cancel()
    return result


# --- the appliance's event log and stream --------------------------------------------------


async def through_the_log(events: int, subscribers: int, batch: int, state: Path,
                          rate: float = 0.0) -> dict[str, float]:
    ports = dict.fromkeys(["admin", "api", "events", "media", "provisioning", "ops", "support"], 0)
    config = parse_config({
        "lan": {"bind": "127.0.0.1", "ports": {**ports, "discovery": 0}}, "storage": {"dir": str(state)},
        "admin": {"token": "bench-token"}, "cloud": {"api_url": "https://127.0.0.1:9"},
        "discovery": {"enabled": False}, "orders": {"enabled": False}, "log": {"level": "warning"},
        "events": {"max_subscribers": subscribers + 8},
    })
    runtime = await open_runtime(config)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: supervise_all(runtime, service_specs(runtime),
                                                                  task_status=task_status))
            url = f"ws://127.0.0.1:{runtime.ports['events']}/v1/events?topics=catalog&coalesce=1&token=bench-token"
            proc = await trio.to_thread.run_sync(start_subscribers, url, subscribers, events)
            started, clock = time.time(), trio.current_time()
            for k, first in enumerate(range(0, events, batch)):
                if rate:
                    await trio.sleep_until(clock + k * batch / rate)

                def write(conn: Any, first: int = first) -> None:
                    now = time.time()
                    for i in range(first, min(events, first + batch)):
                        append(conn, "price.changed", {**message(i), "t": now}, now=now, subject=f"SKU-{i:06d}")

                await runtime.db.write(write)
            result = await trio.to_thread.run_sync(finish, proc, started, events, subscribers)
            dispatch = dict((labels["quantile"], v) for labels, v in runtime.event_hub.handoff_quantiles())
            result["dispatch_p50_ms"], result["dispatch_p99_ms"] = dispatch["0.5"] * 1000, dispatch["0.99"] * 1000
            runtime.stopping.set()
    finally:
        runtime.db.close()
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        trio.run(subscribers_main, sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(prog="scripts/bench events", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--subscribers", type=int, default=200)
    parser.add_argument("--batch", type=int, default=100, help="events per transaction (default 100)")
    # 100 events/s is several times a busy shop's rate, and at 200 subscribers 20,000
    # deliveries/s: within what the subscribers' one process takes, so the figure is latency.
    parser.add_argument("--rate", type=float, default=100.0,
                        help="paced phase: events/s, one commit every 10 ms (default 100)")
    parser.add_argument("--seconds", type=float, default=5.0, help="paced phase: how long (default 5)")
    _cpus.add_option(parser)
    args = parser.parse_args()
    raw = trio.run(baseline, args.events, args.subscribers, args.batch, False)
    packed = trio.run(baseline, args.events, args.subscribers, args.batch, True)
    with tempfile.TemporaryDirectory() as tmp:
        log = trio.run(through_the_log, args.events, args.subscribers, args.batch, Path(tmp))
    paced_events, tick = int(args.rate * args.seconds), max(1, int(args.rate / 100))
    paced_raw = trio.run(baseline, paced_events, args.subscribers, tick, True, args.rate)
    with tempfile.TemporaryDirectory() as tmp:
        paced_log = trio.run(through_the_log, paced_events, args.subscribers, tick, Path(tmp), args.rate)

    def show(name: str, r: dict[str, float]) -> None:
        print(f"  {name:42s} {r['per_s']:>10,.0f} deliveries/s  {r['elapsed_s']:6.2f} s  "
              f"p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  resumed {r['resumes']:.0f}")

    print(f"burst: {args.events} events to {args.subscribers} subscribers, {args.batch} per commit, "
          "as fast as they commit")
    show("raw trio-websocket, one message per event", raw)
    show("raw trio-websocket, packed per commit", packed)
    show("event log on 8001 (coalesce=1)", log)
    print(f"  throughput: {log['per_s'] / raw['per_s']:.2f}x the one-message-per-event baseline, "
          f"{log['per_s'] / packed['per_s']:.2f}x the packed one (goal >= 0.5x)")
    print(f"paced: {args.rate:g} events/s for {args.seconds:g} s ({paced_events} events, {tick} per commit) "
          f"to {args.subscribers} subscribers")
    show("raw trio-websocket, packed per commit", paced_raw)
    show("event log on 8001 (coalesce=1)", paced_log)
    print(f"  write-to-delivery p99: {paced_log['p99_ms']:.1f} ms (goal < 100 ms; counted from before the "
          f"commit's fsync), baseline {paced_raw['p99_ms']:.1f} ms; in the box, commit to each subscriber's "
          f"connection taking the event: p50 {paced_log['dispatch_p50_ms']:.1f} ms, "
          f"p99 {paced_log['dispatch_p99_ms']:.1f} ms")


if __name__ == "__main__":
    _cpus.run_main(main)
