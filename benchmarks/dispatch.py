"""Device channel: commands/s and enqueue-to-ack latency, durable dispatcher vs raw WebSocket.

Every phase pushes to the same simulated devices (default 50), served by a separate process
on loopback so the devices do not run on the event loop being measured:

- baseline: raw trio-websocket, one connection per device, the same window, no storage:
  what the network and the device simulator cost by themselves;
- dispatch: the appliance's dispatcher in-process, with its SQLite outbox (every enqueue a
  durable commit, sends and acks recorded in batches);
- mosquitto: Debian's MQTT broker 2.0 (started here on a loopback port, default
  persistence), the same command and ack messages published with QoS 1 both ways, one
  connection per device on each side, the same window (``benchmarks/_mqtt.py``): what a
  user who picked a broker instead would get.

Two measures each: throughput (every device gets ``--burst`` commands at once; for
dispatch, one transaction enqueues them all) from the first enqueue to the last ack; and
enqueue-to-ack latency at an offered load of ``--rate`` commands/s spread over the
devices for ``--seconds`` (for dispatch, each command is its own durable commit, and the
time runs from when it was due to be enqueued).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import attrs
import trio
from trio_websocket import open_websocket

from appliance.config import parse_config
from appliance.devkit.device import DeviceSimulator, run_device_simulator
from appliance.protocol.channel_codec import (
    MAX_DEVICE_MESSAGE_BYTES,
    SUBPROTOCOL,
    Ack,
    Command,
    encode_command,
    parse_device_message,
)
from appliance.services import heap
from appliance.services.device_link import LinkTarget
from appliance.services.dispatcher import enqueue, run_dispatcher
from appliance.services.loop_lag import hand_back_the_gil
from appliance.storage.db import SLOW_COMMIT_S, SlowCommit
from appliance.storage.outbox import enqueue_in
from appliance.supervisor import open_runtime
from benchmarks import _cpus
from benchmarks._mqtt import Mqtt, mosquitto

Latencies = list[float]


# --- the device farm (a child process) ------------------------------------------------


def _farm_gc_off() -> None:
    """A farm stands for separate devices, so it runs without Python's cyclic collector:
    the simulators remember every command they took (tens of thousands of objects by the
    paced phase), and one full pass over them (50-400 ms measured here) stalled every
    device's acks at once, something no set of real devices does. The farm lives a minute;
    the few cycles it leaves are freed at its exit."""
    gc.disable()


async def serve_farm(count: int) -> None:
    sims = [DeviceSimulator(device_id=f"bench-{i:02d}") for i in range(count)]
    async with trio.open_nursery() as nursery:
        ports = [await nursery.start(partial(run_device_simulator, s, port=0, bind="127.0.0.1")) for s in sims]
        print(json.dumps(ports), flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(0))
        while await stdin.receive_some():  # until the parent closes our stdin
            pass
        nursery.cancel_scope.cancel()


# --- baseline: raw WebSocket, no storage ------------------------------------------------


async def baseline_device(port: int, device_id: str, window: int, schedule: list[float], out: Latencies) -> None:
    """Send ``len(schedule)`` commands, each no earlier than its due time; record due-to-ack."""
    async with open_websocket("127.0.0.1", port, "/", use_ssl=False, subprotocols=[SUBPROTOCOL],
                              max_message_size=MAX_DEVICE_MESSAGE_BYTES) as ws:
        parse_device_message(await ws.get_message())  # hello
        slots = trio.Semaphore(window)
        due: dict[str, float] = {}
        start = trio.current_time()  # a burst (due at 0) counts from here

        async def receive() -> None:
            for _ in schedule:
                message = parse_device_message(await ws.get_message())
                assert isinstance(message, Ack)
                out.append(trio.current_time() - due.pop(message.id))
                slots.release()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            for n, at in enumerate(schedule, 1):
                await trio.sleep_until(at)
                await slots.acquire()
                command_id = f"b-{device_id}-{time.monotonic_ns()}-{n}"
                due[command_id] = max(at, start)
                await ws.send_message(encode_command(Command(id=command_id, seq=n, kind="print", expires_at=None,
                                                             body=f'{{"n":{n}}}')))


async def run_baseline(ports: list[int], window: int, schedules: list[list[float]]) -> tuple[Latencies, float]:
    out: Latencies = []
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i, port in enumerate(ports):
            nursery.start_soon(baseline_device, port, f"bench-{i:02d}", window, schedules[i], out)
    return out, time.perf_counter() - start


# --- mosquitto: the same commands through Debian's MQTT broker, QoS 1 both ways -----------


async def serve_mqtt_farm(count: int, port: int) -> None:
    """``count`` MQTT devices: each takes its commands on ``c/<id>`` and answers each with
    the channel's ack message on ``a/<id>`` (QoS 1 both ways), as the simulator does."""
    async with trio.open_nursery() as nursery:
        clients = []
        for i in range(count):
            device_id = f"bench-{i:02d}"
            client = await Mqtt.connect(port, f"dev-{device_id}", nursery)
            await client.subscribe(f"c/{device_id}")
            clients.append((device_id, client))

        async def device(device_id: str, client: Mqtt) -> None:
            while True:
                message = await client.receive()
                command_id = json.loads(message.payload)["id"]
                await client.publish(f"a/{device_id}", json.dumps({"t": "ack", "id": command_id}).encode(),
                                     wait=False)

        for device_id, client in clients:
            nursery.start_soon(device, device_id, client)
        print("[]", flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(0))
        while await stdin.receive_some():
            pass
        nursery.cancel_scope.cancel()


async def mqtt_device(port: int, device_id: str, window: int, schedule: list[float], out: Latencies) -> None:
    """As :func:`baseline_device`, through the broker: publish QoS 1, the ack back QoS 1."""
    async with trio.open_nursery() as nursery:
        client = await Mqtt.connect(port, f"box-{device_id}", nursery)
        await client.subscribe(f"a/{device_id}")
        slots = trio.Semaphore(window)
        due: dict[str, float] = {}
        start = trio.current_time()

        async def receive() -> None:
            for _ in schedule:
                message = await client.receive()
                out.append(trio.current_time() - due.pop(json.loads(message.payload)["id"]))
                slots.release()

        async with trio.open_nursery() as inner:
            inner.start_soon(receive)
            for n, at in enumerate(schedule, 1):
                await trio.sleep_until(at)
                await slots.acquire()
                command_id = f"m-{device_id}-{time.monotonic_ns()}-{n}"
                due[command_id] = max(at, start)
                await client.publish(f"c/{device_id}", encode_command(Command(
                    id=command_id, seq=n, kind="print", expires_at=None, body=f'{{"n":{n}}}')).encode(), wait=False)
        await client.aclose()
        nursery.cancel_scope.cancel()


async def run_mqtt(port: int, devices: int, window: int, schedules: list[list[float]]) -> tuple[Latencies, float]:
    out: Latencies = []
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(devices):
            nursery.start_soon(mqtt_device, port, f"bench-{i:02d}", window, schedules[i], out)
    return out, time.perf_counter() - start


# --- dispatch: the appliance's dispatcher --------------------------------------------------


async def run_dispatch(ports: list[int], state_dir: Path, *, window: int, burst: int, rate: float,
                       seconds: float, disk_witness: bool = False
                       ) -> tuple[float, Latencies, float, dict[str, Latencies], tuple[int, int, int],
                                  tuple[float, float], list[SlowCommit], list[bool], list[tuple[float, float]] | None]:
    """``(throughput seconds, paced latencies, one durable commit in seconds, the paced
    latencies' stages, the paced phase's checkpoints, the box's CPU seconds per command in
    the burst and in the paced phase)``: the stages are ``due->sent``, ``enqueue`` (due to
    the enqueue's return: the wait for the writer and the durable commit) and
    ``sent->acked``; the checkpoints: those beside the writer, of them those that held it,
    and the writer's own threshold (0: off, none runs inside a commit;
    appliance/storage/db.py). The CPU is this process's (every thread: the loop, the
    writer, the checkpointer; not the devices' process), a figure the machine's load
    hardly moves; the paced phase's slow commits (``Database.slow_commit_log``, their ``at``
    on trio's clock), for each paced latency whether its enqueue was under way while one
    of them was, and with ``disk_witness`` the slow writes of :func:`disk_witness` run in
    another process beside the paced phase (``(at on trio's clock, seconds)``; else None)."""
    config = parse_config({"storage": {"dir": str(state_dir)},
                           "admin": {"token": "bench-admin-token-0123456789", "first_start_ticket": False},
                           "dispatch": {"window": window}})
    runtime = await open_runtime(config)
    targets = [LinkTarget(id=f"bench-{i:02d}", kind="printer", name="", address="127.0.0.1", port=p)
               for i, p in enumerate(ports)]
    board = runtime.device_links

    def acked() -> int:
        return sum(s.acked for s in board.all())

    checkpointer_scope = trio.CancelScope()

    async def checkpointer(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with checkpointer_scope:  # as the box's storage.checkpoints service: the WAL copied beside the writer
            await runtime.db.run_checkpoints(task_status=task_status)

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(checkpointer)
            await nursery.start(partial(run_dispatcher, runtime, adopted=lambda conn: targets))
            heap.settle()  # as the process does once it is up (appliance.supervisor.run)

            # One durable commit, alone: what every enqueue pays on this disk.
            def touch(conn: sqlite3.Connection) -> None:
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('bench', ?)", (str(time.time()),))

            commits = []
            for _ in range(20):
                started = time.perf_counter()
                await runtime.db.write(touch)
                commits.append(time.perf_counter() - started)
            commit_s = statistics.median(commits)

            # Throughput: a burst for every device, enqueued in one transaction.
            def burst_all(conn: sqlite3.Connection) -> None:
                for n in range(burst):
                    for target in targets:
                        enqueue_in(conn, target.id, "print", {"n": n})

            start, cpu = time.perf_counter(), time.process_time()
            await runtime.db.write(burst_all)
            runtime.outbox_changes.notify()
            await until(lambda: acked() >= burst * len(targets))
            burst_s = time.perf_counter() - start
            burst_cpu = (time.process_time() - cpu) / (burst * len(targets))

            # Latency: each command enqueued (one durable commit each) when it is due.
            due: dict[str, float] = {}
            enqueued: dict[str, float] = {}
            ack_at: dict[str, float] = {}
            sent_at: dict[str, float] = {}
            base = acked()
            db = runtime.db
            checkpoints = (db.checkpoints, db.checkpoints_holding_writer)
            paced = paced_schedule(len(targets), rate, seconds, trio.current_time() + 0.5)
            total = sum(len(s) for s in paced)

            async def producer(target: LinkTarget, schedule: list[float]) -> None:
                for n, at in enumerate(schedule):
                    await trio.sleep_until(at)
                    command_id = f"lat-{target.id}-{n}"
                    due[command_id] = at
                    await enqueue(runtime, target.id, "print", {"n": n}, command_id=command_id)
                    enqueued[command_id] = trio.current_time()

            witnessed: list[tuple[float, float]] | None = None
            witness_done = trio.Event()

            async def witness() -> None:
                nonlocal witnessed
                done = await trio.run_process([sys.executable, "-m", "benchmarks.dispatch", "--disk-witness-child",
                                               f"{seconds + 1:g}", str(state_dir)], capture_stdout=True)
                to_trio = trio.current_time() - time.perf_counter()  # one clock (monotonic) in both processes
                witnessed = [(at + to_trio, took) for at, took in json.loads(done.stdout)]
                witness_done.set()

            if disk_witness:
                nursery.start_soon(witness)
            cpu, paced_from = time.process_time(), time.perf_counter()
            async with trio.open_nursery() as producers:
                for target, schedule in zip(targets, paced, strict=True):
                    producers.start_soon(producer, target, schedule)
            await until(lambda: acked() >= base + total)
            paced_cpu = (time.process_time() - cpu) / total
            to_trio = trio.current_time() - time.perf_counter()
            slow = [attrs.evolve(c, at=c.at + to_trio) for c in list(db.slow_commit_log) if c.at >= paced_from]
            checkpoints = (db.checkpoints - checkpoints[0], db.checkpoints_holding_writer - checkpoints[1],
                           await db.write(lambda conn: conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0],
                                          durable=False))
            def settled(conn: sqlite3.Connection) -> list[sqlite3.Row]:
                return conn.execute("SELECT id, sent_at, settled_at FROM outbox WHERE id LIKE 'lat-%'").fetchall()

            rows = await runtime.db.read(settled)
            with trio.fail_after(60):
                while any(r["settled_at"] is None for r in rows):  # acked, not yet recorded
                    await trio.sleep(0.05)
                    rows = await runtime.db.read(settled)
            for row in rows:
                ack_at[row["id"]], sent_at[row["id"]] = row["settled_at"], row["sent_at"]
            # Both clocks: due times are on trio's clock, sends and acks on the wall clock; convert.
            offset = time.time() - trio.current_time()
            latencies = [ack_at[i] - (at + offset) for i, at in due.items()]
            # The paced commands whose enqueue was under way while a slow commit was (its own or
            # one ahead of it holding the writer): what the disk's stalls cost, by command.
            held_by_slow = [any(at < c.at + c.seconds and enqueued[i] > c.at for c in slow) for i, at in due.items()]
            stages = {"due->sent": [sent_at[i] - (at + offset) for i, at in due.items()],
                      "enqueue": [enqueued[i] - at for i, at in due.items()],
                      "sent->acked": [ack_at[i] - sent_at[i] for i in due]}
            if disk_witness:
                with trio.fail_after(seconds + 30):
                    await witness_done.wait()
            runtime.stopping.set()
            checkpointer_scope.cancel()
    finally:
        runtime.db.close()
    return (burst_s, latencies, commit_s, stages, checkpoints, (burst_cpu, paced_cpu), slow, held_by_slow,
            witnessed)


def disk_witness(seconds: float, directory: Path) -> list[tuple[float, float]]:
    """For ``seconds``: write 20 KiB (about an enqueue's WAL frames and a recorder's) and
    fdatasync it, 100 times a second, in ``directory``, with no SQLite; returns the writes
    that took :data:`SLOW_COMMIT_S` or longer as ``(time.perf_counter() at the start,
    seconds)``. Run in its own process beside the paced phase (``--disk-witness``): a stall
    it shares with the box's slow commits is the disk's, not the box's."""
    path = directory / "disk-witness"
    block = os.urandom(20 * 1024)
    slow: list[tuple[float, float]] = []
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        end, n = time.perf_counter() + seconds, 0
        while (started := time.perf_counter()) < end:
            os.pwrite(fd, block, (n % 200) * len(block))  # a WAL-sized file, rewritten in turn
            os.fdatasync(fd)
            took = time.perf_counter() - started
            if took >= SLOW_COMMIT_S:
                slow.append((started, took))
            n += 1
            time.sleep(max(0.0, started + 0.01 - time.perf_counter()))
    finally:
        os.close(fd)
        path.unlink()
    return slow


class GcPauses:
    """Every collection of Python's cyclic GC in this process while open, by generation:
    the stop of the event loop each one is (a full pass over a large heap stops every task)."""

    def __init__(self) -> None:
        self.by_generation: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._started = 0.0

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.by_generation[info["generation"]].append(time.perf_counter() - self._started)

    def summary(self) -> str:
        full, young = self.by_generation[2], self.by_generation[0] + self.by_generation[1]
        return (f"{len(full)} full (longest {max(full, default=0) * 1e3:.1f} ms), {len(young)} young "
                f"(longest {max(young, default=0) * 1e3:.1f} ms)")


async def until(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(600):
        while not predicate():  # noqa: ASYNC110  (a benchmark loop; 5 ms of granularity is fine)
            await trio.sleep(0.005)


def percentile(values: Latencies, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def paced_schedule(devices: int, rate: float, seconds: float, start: float) -> list[list[float]]:
    """Due times on trio's clock: ``rate`` commands/s in total, round-robin over devices."""
    out: list[list[float]] = [[] for _ in range(devices)]
    for k in range(int(rate * seconds)):
        out[k % devices].append(start + k / rate)
    return out


async def _farm(args: list[str]) -> tuple[trio.Process, list[int]]:
    farm = await trio.lowlevel.open_process([sys.executable, "-m", "benchmarks.dispatch", *args],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert farm.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        line += await farm.stdout.receive_some()
    return farm, json.loads(line)


async def _stop(farm: trio.Process) -> None:
    assert farm.stdin is not None
    await farm.stdin.aclose()
    with trio.move_on_after(5):
        await farm.wait()
    if farm.returncode is None:
        farm.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def main(args: argparse.Namespace) -> None:
    total = args.burst * args.devices
    bursts: list[list[float]] = [[0.0] * args.burst for _ in range(args.devices)]

    def paced() -> list[list[float]]:
        return paced_schedule(args.devices, args.rate, args.seconds, trio.current_time() + 0.2)

    heap.settle()  # every phase runs in a process settled as the appliance's is (run_dispatch again)
    hand_back_the_gil()  # and with its switch interval
    farm, ports = await _farm(["--serve-devices", str(args.devices)])
    try:
        # Baseline throughput, then latency at the offered load.
        _, base_burst_s = await run_baseline(ports, args.window, bursts)
        base_lat, _ = await run_baseline(ports, args.window, paced())
        with tempfile.TemporaryDirectory(prefix="bench-dispatch-") as tmp, GcPauses() as pauses:
            disp_burst_s, disp_lat, commit_s, stages, checkpoints, cpu, slow, held, witnessed = await run_dispatch(
                ports, Path(tmp), window=args.window, burst=args.burst, rate=args.rate, seconds=args.seconds,
                disk_witness=args.disk_witness)
    finally:
        await _stop(farm)
    mqtt_burst_s, mqtt_lat = float("nan"), [float("nan")]
    if not args.no_mosquitto:
        port = _free_port()
        with mosquitto(port):
            farm, _ = await _farm(["--serve-mqtt-devices", str(args.devices), "--mqtt-port", str(port)])
            try:
                _, mqtt_burst_s = await run_mqtt(port, args.devices, args.window, bursts)
                mqtt_lat, _ = await run_mqtt(port, args.devices, args.window, paced())
            finally:
                await _stop(farm)

    def p(values: Latencies, q: float) -> float:
        return percentile(values, q) * 1e3

    base_tput, disp_tput, mqtt_tput = total / base_burst_s, total / disp_burst_s, total / mqtt_burst_s
    rows = [
        ("throughput, commands/s", f"{base_tput:,.0f}", f"{mqtt_tput:,.0f}", f"{disp_tput:,.0f}",
         f"{disp_tput / base_tput:.2f}x", f"{disp_tput / mqtt_tput:.2f}x"),
        (f"latency at {args.rate:g}/s, p50 ms", f"{p(base_lat, .5):.1f}", f"{p(mqtt_lat, .5):.1f}",
         f"{p(disp_lat, .5):.1f}", f"{p(disp_lat, .5) / p(base_lat, .5):.1f}x",
         f"{p(disp_lat, .5) / p(mqtt_lat, .5):.1f}x"),
        (f"latency at {args.rate:g}/s, p99 ms", f"{p(base_lat, .99):.1f}", f"{p(mqtt_lat, .99):.1f}",
         f"{p(disp_lat, .99):.1f}", f"{p(disp_lat, .99) / p(base_lat, .99):.1f}x",
         f"{p(disp_lat, .99) / p(mqtt_lat, .99):.1f}x"),
    ]
    print(f"device channel: {args.devices} simulated devices on loopback (another process), window {args.window}")
    print(f"throughput: {args.burst} commands per device at once ({total} in all); latency: {args.rate:g} "
          f"commands/s for {args.seconds:g} s ({len(disp_lat)} commands)")
    print(f"one durable commit (fsync) on this disk: {commit_s * 1e3:.1f} ms; mosquitto: Debian's, QoS 1 both ways, "
          "default persistence (saved every 1800 s and at exit)")
    print(f"Python's GC in the box's process during the dispatch phases: {pauses.summary()}; start-up heap "
          f"frozen ({gc.get_freeze_count():,} objects), as the appliance does once it is up")
    print(f"{'':28}{'raw ws':>10}{'mosquitto':>11}{'dispatch':>10}{'vs raw':>9}{'vs mqtt':>9}")
    for name, base, mqtt, disp, vs_raw, vs_mqtt in rows:
        print(f"{name:28}{base:>10}{mqtt:>11}{disp:>10}{vs_raw:>9}{vs_mqtt:>9}")
    print("dispatch's paced commands by stage, p50 / p99 ms: " + "; ".join(
        f"{name} {p(values, .5):.1f} / {p(values, .99):.1f}" for name, values in stages.items()))
    print("  (enqueue: from due to the enqueue's return, the durable commit included; sent->acked: the wire and "
          "the device, as the raw ws column)")
    print(f"  the box's CPU per command (every thread of its process, not the devices'): burst "
          f"{cpu[0] * 1e6:,.0f} us, at {args.rate:g}/s {cpu[1] * 1e6:,.0f} us (the paced phase's whole time, "
          "the links' idle work included)")
    inside = ("none inside a commit (the writer's own is off)" if checkpoints[2] == 0 else
              f"the writer's own on (every {checkpoints[2]} pages, inside the commit that crosses it)")
    print(f"  WAL checkpoints in the paced phase: {checkpoints[0]} beside the writer ({checkpoints[1]} of them holding "
          f"it for their last pages); {inside}")
    print(f"  commits of {SLOW_COMMIT_S * 1e3:.0f} ms or longer in the paced phase (the COMMIT alone: the disk's write "
          f"and sync; mosquitto writes nothing): {len(slow)}" + (
              f", longest {max(c.seconds for c in slow) * 1e3:.0f} ms; {sum(held)} paced commands were enqueued "
              f"meanwhile: without them p99 {p([v for v, h in zip(disp_lat, held, strict=True) if not h], .99):.1f} ms"
              if slow else ""))
    if witnessed is not None:
        shared = sum(any(at < c.at + c.seconds and c.at < at + took for at, took in witnessed) for c in slow)
        print(f"  disk witness (another process: 20 KiB written and fdatasynced 100 times/s beside the paced phase, "
              f"no SQLite): {len(witnessed)} writes of {SLOW_COMMIT_S * 1e3:.0f} ms or longer"
              + (f", longest {max(took for _, took in witnessed) * 1e3:.0f} ms" if witnessed else "")
              + f"; {shared} of the box's {len(slow)} slow commits at the same time as one")
    print("goals (issue 16): throughput >= 0.5x mosquitto's; p99 <= 1.5x mosquitto's")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench dispatch", description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--devices", type=int, default=50)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--burst", type=int, default=200, help="commands per device for the throughput run")
    p.add_argument("--rate", type=float, default=100.0, help="commands/s in all for the latency run")
    p.add_argument("--seconds", type=float, default=10.0, help="length of the latency run")
    p.add_argument("--no-mosquitto", action="store_true", help="skip the mosquitto peer")
    p.add_argument("--disk-witness", action="store_true", help=(
        "beside the paced phase, write and fdatasync 20 KiB 100 times/s in another process (no SQLite) and "
        "say which of the box's slow commits it stalled with (the disk's own stalls; adds that load)"))
    p.add_argument("--disk-witness-child", nargs=2, metavar=("SECONDS", "DIRECTORY"), help=argparse.SUPPRESS)
    p.add_argument("--serve-devices", type=int, help=argparse.SUPPRESS)
    p.add_argument("--serve-mqtt-devices", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mqtt-port", type=int, help=argparse.SUPPRESS)
    _cpus.add_option(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.disk_witness_child:
        seconds_, directory = arguments.disk_witness_child
        print(json.dumps(disk_witness(float(seconds_), Path(directory))))
    elif arguments.serve_devices:
        _farm_gc_off()
        trio.run(serve_farm, arguments.serve_devices)
    elif arguments.serve_mqtt_devices:
        _farm_gc_off()
        trio.run(serve_mqtt_farm, arguments.serve_mqtt_devices, arguments.mqtt_port)
    else:
        _cpus.run(partial(trio.run, main), arguments)
