"""The dispatcher and its device links, on memory streams (trio.testing.memory_stream_pair)
served by the real device simulator or by scripted misbehaving devices, with a real
SQLite outbox. Then the HTTP side: the command API on the store API port and the
homepage section, on a whole running appliance with real hypercorn and TCP devices.

Time is virtual: a MockClock that jumps only after 10 ms of real idleness, and waits that
poll every 0.1 virtual second, so a database call in a worker thread moves virtual time
by a tenth of a second at most and never races it past a timeout.
"""

from __future__ import annotations

import errno
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

from appliance.devkit.device import DeviceSimulator, read_log, run_device_simulator
from appliance.protocol.channel_codec import SUBPROTOCOL, Hello, encode_device_message
from appliance.protocol.health import Status
from appliance.services.device_link import DeviceLink, DeviceLinkPhase, LinkTarget
from appliance.services.dispatcher import enqueue, run_dispatcher
from appliance.services.runtime import Runtime
from appliance.services.web.commands import MAX_BATCH
from appliance.storage.outbox import CommandState, enqueue_in, list_commands
from appliance.supervisor import open_runtime
from tests.conftest import ConfigFactory, device_key, running_box

Serve = Callable[[trio.abc.Stream], Awaitable[None]]


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0.01)


class MemoryLan:
    """Devices reachable by (address, port) over memory streams; nothing touches a socket."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.devices: dict[tuple[str, int], Serve] = {}
        self.attempts: list[tuple[float, str]] = []
        self._scopes: dict[tuple[str, int], list[trio.CancelScope]] = {}

    def plug(self, address: str, port: int, serve: Serve) -> None:
        self.devices[(address, port)] = serve

    def unplug(self, address: str, port: int) -> None:
        """Take the device off the network: its open connections die with it."""
        self.devices.pop((address, port), None)
        for scope in self._scopes.pop((address, port), []):
            scope.cancel()

    async def open_stream(self, host: str, port: int) -> trio.abc.Stream:
        self.attempts.append((trio.current_time(), host))
        serve = self.devices.get((host, port))
        if serve is None:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        client, server = trio.testing.memory_stream_pair()
        scope = trio.CancelScope()
        self._scopes.setdefault((host, port), []).append(scope)

        async def run() -> None:
            with scope:
                await serve(server)
            await server.aclose()

        self.nursery.start_soon(run)
        return client


def target(device_id: str, address: str = "10.0.0.5", port: int = 8081) -> LinkTarget:
    return LinkTarget(id=device_id, kind="printer", name=device_id, address=address, port=port)


@pytest.fixture
async def runtime(make_config: ConfigFactory) -> AsyncIterator[Runtime]:
    rt = await open_runtime(make_config(dispatch={"backoff_initial_s": 1.0, "backoff_max_s": 8.0,
                                                  "ping_interval_s": 300.0, "maintenance_interval_s": 3600.0}))
    # A health run waits on database threads while nothing else polls, so under load the
    # MockClock could jump straight to the checks' 5 s timeout and report a check as stuck.
    rt.health.check_timeout_s = 3600.0
    yield rt
    rt.db.close()


@asynccontextmanager
async def dispatching(runtime: Runtime, targets: list[LinkTarget],
                      plugged: dict[str, Serve] | None = None) -> AsyncIterator[MemoryLan]:
    """A running dispatcher over a memory LAN (``plugged``: devices on it from the start, by
    address, port 8081); stopped gracefully on the way out."""
    async with trio.open_nursery() as nursery:
        lan = MemoryLan(nursery)
        for address, serve in (plugged or {}).items():
            lan.plug(address, 8081, serve)
        done = trio.Event()

        async def dispatcher(task_status: trio.TaskStatus[None]) -> None:
            await run_dispatcher(runtime, open_stream=lan.open_stream, adopted=lambda conn: list(targets),
                                 clock=trio.current_time, rng=random.Random(7), task_status=task_status)
            done.set()

        await nursery.start(dispatcher)
        yield lan
        runtime.stopping.set()
        # Polled, not awaited: a bare wait would let the MockClock jump straight to a
        # timeout while the graceful stop waits on a database thread under load.
        await wait_for(done.is_set)
        nursery.cancel_scope.cancel()


async def enqueue_many(runtime: Runtime, items: Sequence[tuple[str, dict[str, Any]]],
                       expires_at: float | None = None) -> list[str]:
    """Many commands in one transaction (the order receiver's way), then one wake-up."""

    def write(conn: Any) -> list[str]:
        return [enqueue_in(conn, device, "print", body, expires_at).id for device, body in items]

    ids = await runtime.db.write(write)
    runtime.outbox_changes.notify()
    return ids


async def wait_for(predicate: Callable[[], bool]) -> None:
    """Until ``predicate()`` holds (the simulators and the link board have no change signal
    to wait on: poll). Bounded, so a broken test fails instead of hanging; callers on real
    time bound it tighter with their own ``fail_after``."""
    with trio.fail_after(600):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.1)


async def bounded(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        await wait_for(predicate)


async def states(runtime: Runtime, device_id: str) -> dict[str, CommandState]:
    rows = await runtime.db.read(partial(list_commands, device_id=device_id, limit=500))
    return {r.id: r.state for r in rows}


# --- delivery --------------------------------------------------------------------------


async def test_every_command_reaches_its_device_once_in_order(clock: trio.testing.MockClock,
                                                              runtime: Runtime) -> None:
    sims = {f"p{i}": DeviceSimulator(device_id=f"p{i}") for i in range(3)}
    targets = [target(d, address=f"10.0.0.{i + 5}") for i, d in enumerate(sims)]
    async with dispatching(runtime, targets) as lan:
        for t in targets:
            lan.plug(t.address, t.port, sims[t.id].serve_stream)
        ids = await enqueue_many(runtime, [(f"p{n % 3}", {"n": n}) for n in range(150)])
        # A second batch through the one-at-a-time path, while the first is in flight.
        ids += [(await enqueue(runtime, f"p{n % 3}", "print", {"n": n})).id for n in range(150, 180)]
        await wait_for(lambda: sum(len(s.accepted) for s in sims.values()) >= 180)
        await wait_for(lambda: all(s.acked == 60 for s in runtime.device_links.all()))
    for i, (device_id, sim) in enumerate(sims.items()):
        assert [a.body["n"] for a in sim.accepted] == list(range(i, 180, 3))
        assert [a.seq for a in sim.accepted] == list(range(1, 61))
        assert sim.duplicates == 0 and sim.connections == 1
        assert set((await states(runtime, device_id)).values()) == {CommandState.ACKED}
    assert runtime.metrics.value("device_commands_acked", device="p1") == 60
    assert len(set(ids)) == 180


async def links_up_and_swept(runtime: Runtime) -> None:
    """Every link connected, and the maintenance sweep (durable writes of its own) done."""
    await wait_for(lambda: runtime.device_links.backlog_at is not None and
                   all(s.phase is DeviceLinkPhase.CONNECTED for s in runtime.device_links.all()))


async def test_sends_and_acks_are_recorded_without_waiting_for_the_disk(clock: trio.testing.MockClock,
                                                                        runtime: Runtime) -> None:
    """Only the enqueue waits for an fsync: the records of its sending and its ack are
    committed without (docs/device-channel.md, "Durability, end to end")."""
    sim = DeviceSimulator(device_id="p0")
    t = target("p0")
    async with dispatching(runtime, [t], plugged={t.address: sim.serve_stream}):
        await links_up_and_swept(runtime)
        db = runtime.db
        durable, groups = db.durable_groups, db.groups
        ids = [(await enqueue(runtime, "p0", "print", {"n": n})).id for n in range(5)]
        await wait_for(lambda: sum(s.acked for s in runtime.device_links.all()) == 5)
        while set((await states(runtime, "p0")).values()) != {CommandState.ACKED}:  # noqa: ASYNC110  (recorded soon)
            await trio.sleep(0.1)
    assert [a.id for a in sim.accepted] == ids
    assert db.durable_groups - durable == 5  # the five enqueues
    assert db.groups - groups > 5  # and the records' own commits, none durable


async def test_a_commands_sent_and_acked_records_share_one_commit(clock: trio.testing.MockClock,
                                                                   runtime: Runtime) -> None:
    """While a command is in flight its sent record waits (at most 0.1 s) for the window to
    empty: with the ack ~1 ms later both go in one commit of the recorder, not one each."""
    sim = DeviceSimulator(device_id="p0")
    t = target("p0")
    async with dispatching(runtime, [t], plugged={t.address: sim.serve_stream}):
        await links_up_and_swept(runtime)
        db = runtime.db

        async def one(n: int) -> None:
            command_id = (await enqueue(runtime, "p0", "print", {"n": n})).id
            while (await states(runtime, "p0")).get(command_id) is not CommandState.ACKED:  # noqa: ASYNC110
                await trio.sleep(0.01)

        await one(0)  # and with it, every record of the link's start written
        records_before = db.groups - db.durable_groups
        for n in range(1, 6):
            await one(n)
        assert db.groups - db.durable_groups - records_before == 5
    rows = await runtime.db.read(partial(list_commands, device_id="p0", limit=10))
    assert len(rows) == 6
    assert all(r.attempts == 1 and r.sent_at is not None and r.sent_at <= (r.settled_at or 0) for r in rows)


async def test_a_slow_devices_sent_record_waits_no_more_than_its_bound(clock: trio.testing.MockClock,
                                                                        runtime: Runtime) -> None:
    """A device that takes a second to ack: its command shows as sent within the records'
    hold (0.1 s), not only once the ack comes."""
    slow = DeviceSimulator(device_id="slow", delay_s=1.0)
    t = target("slow")
    async with dispatching(runtime, [t], plugged={t.address: slow.serve_stream}):
        await wait_for(lambda: all(s.phase is DeviceLinkPhase.CONNECTED for s in runtime.device_links.all()))
        command_id = (await enqueue(runtime, "slow", "print", {})).id
        enqueued_at = trio.current_time()
        while (await states(runtime, "slow")).get(command_id) is CommandState.QUEUED:  # noqa: ASYNC110
            await trio.sleep(0.01)
        assert (await states(runtime, "slow"))[command_id] is CommandState.SENT
        assert trio.current_time() - enqueued_at <= 0.2
        assert runtime.device_links.links["slow"].acked == 0
        await wait_for(lambda: runtime.device_links.links["slow"].acked == 1)


async def test_unreachable_device_backs_off_with_jitter_and_says_why(clock: trio.testing.MockClock,
                                                                     runtime: Runtime) -> None:
    async with dispatching(runtime, [target("kds-1")]) as lan:
        await enqueue(runtime, "kds-1", "order.created", {"order": 1})
        await wait_for(lambda: len(lan.attempts) >= 6)
        gaps = [b[0] - a[0] for a, b in zip(lan.attempts, lan.attempts[1:], strict=False)]
        # 1, 2, 4, 8, 8 s (capped), each jittered down by at most 25 %.
        for gap, base in zip(gaps, [1, 2, 4, 8, 8], strict=False):
            assert base * 0.75 <= gap <= base, gaps
        status = runtime.device_links.links["kds-1"]
        assert status.phase is DeviceLinkPhase.BACKING_OFF and status.failures >= 5
        checks = {c.name: c for c in await runtime.health.run_all()}
        link = checks["device.kds-1.channel"]
        assert link.status is Status.FAIL  # a command waits for it
        assert link.message == ("device kds-1: cannot reach 10.0.0.5:8081: connection refused; "
                                "1 command(s) wait for it")
        assert link.fix == "check the device is on and its app running"
        assert checks["dispatch.outbox"].data["depth"] == 1
        # Plugged in at last: the command goes out and the backoff starts over.
        sim = DeviceSimulator(device_id="kds-1", kind="kds")
        lan.plug("10.0.0.5", 8081, sim.serve_stream)
        await wait_for(lambda: len(sim.accepted) == 1)
        await wait_for(lambda: status.acked == 1)
        assert status.phase is DeviceLinkPhase.CONNECTED and status.failures == 0
        checks = {c.name: c for c in await runtime.health.run_all()}
        assert checks["device.kds-1.channel"].status is Status.OK
        assert checks["device.kds-1.channel"].message.startswith("device kds-1: connected to 10.0.0.5:8081")


async def misbehaving(script: Callable[[WebSocketConnection], Awaitable[None]], stream: trio.abc.Stream) -> None:
    """A device that completes the WebSocket handshake, then runs ``script``."""
    async with trio.open_nursery() as nursery:
        request = await wrap_server_stream(nursery, stream)
        ws = await request.accept(subprotocol=SUBPROTOCOL)
        with suppress(ConnectionClosed):
            await script(ws)
        nursery.cancel_scope.cancel()


async def say_garbage(ws: WebSocketConnection) -> None:
    await ws.send_message(encode_device_message(Hello(device_id="bad-1", kind="pos", firmware="0")))
    await ws.send_message('{"t": "ack", "id": ')
    await trio.sleep_forever()


async def say_wrong_hello(ws: WebSocketConnection) -> None:
    await ws.send_message(encode_device_message(Hello(device_id="someone-else", kind="pos", firmware="0")))
    await trio.sleep_forever()


async def say_nothing(ws: WebSocketConnection) -> None:
    await trio.sleep_forever()


async def say_too_much(ws: WebSocketConnection) -> None:
    await ws.send_message(encode_device_message(Hello(device_id="bad-1", kind="pos", firmware="x" * 5000)))
    await trio.sleep_forever()


async def rejecting(stream: trio.abc.Stream) -> None:
    """Not a device channel at all: an HTTP server that says 404 to the upgrade."""
    async with trio.open_nursery() as nursery:
        request = await wrap_server_stream(nursery, stream)
        await request.reject(404, body=b"no such page")
        nursery.cancel_scope.cancel()


async def mute_tcp(stream: trio.abc.Stream) -> None:
    """Something that accepts TCP and never speaks."""
    await trio.sleep_forever()


@pytest.mark.parametrize(("serve", "words"), [
    (partial(misbehaving, say_garbage), "broke the device protocol: a device message must be JSON"),
    (partial(misbehaving, say_wrong_hello), "says it is 'someone-else', not 'bad-1'"),
    (partial(misbehaving, say_nothing), "stopped answering: no hello within 10 s"),
    (partial(misbehaving, say_too_much), "closed (code 1009: Exceeded maximum message size: 4096 bytes)"),
    (rejecting, "refused the device channel (HTTP 404)"),
    (mute_tcp, "the TCP connection opened but no WebSocket answer came within 5 s"),
], ids=["garbage", "wrong-hello", "silent", "too-big", "rejecting", "mute-tcp"])
async def test_a_misbehaving_device_is_dropped_and_backs_off_without_harming_others(
        clock: trio.testing.MockClock, runtime: Runtime, serve: Serve, words: str) -> None:
    good = DeviceSimulator(device_id="good-1")
    async with dispatching(runtime, [target("bad-1", "10.0.0.6"), target("good-1", "10.0.0.7")]) as lan:
        lan.plug("10.0.0.6", 8081, serve)
        lan.plug("10.0.0.7", 8081, good.serve_stream)
        await enqueue_many(runtime, [("bad-1", {"n": n}) for n in range(5)] + [("good-1", {"n": n}) for n in range(5)])
        await wait_for(lambda: len([a for a in lan.attempts if a[1] == "10.0.0.6"]) >= 3)
        await wait_for(lambda: len(good.accepted) == 5)
        bad = runtime.device_links.links["bad-1"]
        assert words in bad.last_error
        assert bad.acked == 0 and bad.failures >= 2
        assert set((await states(runtime, "bad-1")).values()) <= {CommandState.QUEUED, CommandState.SENT}
        assert runtime.board.get("dispatcher") is None  # not supervised here; it never crashed either


async def test_flaky_wifi_and_a_busy_device_still_get_everything_once_in_order(
        clock: trio.testing.MockClock, runtime: Runtime, tmp_path: Path) -> None:
    flaky = DeviceSimulator(device_id="flaky", drop_rate=0.05, seed=1, log_path=tmp_path / "flaky.jsonl")
    busy = DeviceSimulator(device_id="busy", nack_rate=0.1, seed=2, delay_s=0.01)
    async with dispatching(runtime, [target("flaky", "10.0.0.8"), target("busy", "10.0.0.9")]) as lan:
        lan.plug("10.0.0.8", 8081, flaky.serve_stream)
        lan.plug("10.0.0.9", 8081, busy.serve_stream)
        await enqueue_many(runtime, [(d, {"n": n}) for n in range(120) for d in ("flaky", "busy")])
        await wait_for(lambda: len(flaky.accepted) == 120 and len(busy.accepted) == 120)
        await wait_for(lambda: all(s.acked == 120 for s in runtime.device_links.all()))
    flaky.close()
    assert flaky.drops > 0 and flaky.connections > 1
    assert busy.nacks > 0
    for sim in (flaky, busy):
        assert [a.body["n"] for a in sim.accepted] == list(range(120))
    assert [a.seq for a in read_log(tmp_path / "flaky.jsonl")] == list(range(1, 121))


async def test_a_device_that_stops_acking_is_reconnected_and_gets_its_commands_again(
        clock: trio.testing.MockClock, runtime: Runtime) -> None:
    mute_connections: list[float] = []
    received: list[float] = []

    async def mute(ws: WebSocketConnection) -> None:
        mute_connections.append(trio.current_time())
        await ws.send_message(encode_device_message(Hello(device_id="mute", kind="kds", firmware="0")))
        while True:
            await ws.get_message()  # reads and never answers
            received.append(trio.current_time())

    await enqueue(runtime, "mute", "ping", {})
    async with dispatching(runtime, [target("mute")], {"10.0.0.5": partial(misbehaving, mute)}) as lan:
        await wait_for(lambda: len(mute_connections) >= 2)
        status = runtime.device_links.links["mute"]
        assert "no ack for command seq 1 within 30 s" in status.last_error
        # Dropped 30 s after the send, back 1 s (jittered down by at most 25 %) later.
        assert 30.75 <= mute_connections[1] - received[0] <= 31.0
        sim = DeviceSimulator(device_id="mute")
        lan.unplug("10.0.0.5", 8081)
        lan.plug("10.0.0.5", 8081, sim.serve_stream)
        await wait_for(lambda: len(sim.accepted) == 1)


async def test_a_link_whose_pings_go_unanswered_is_dropped(clock: trio.testing.MockClock,
                                                           make_config: ConfigFactory) -> None:
    rt = await open_runtime(make_config(dispatch={"ping_interval_s": 15.0, "ping_timeout_s": 10.0,
                                                  "maintenance_interval_s": 3600.0}))
    connects: list[float] = []

    async def frozen(stream: trio.abc.Stream) -> None:
        # Handshake and hello, then the device's network stack stops reading: no pong ever.
        connects.append(trio.current_time())
        async with trio.open_nursery() as nursery:
            request = await wrap_server_stream(nursery, stream)
            ws = await request.accept(subprotocol=SUBPROTOCOL)
            await ws.send_message(encode_device_message(Hello(device_id="frozen", kind="kds", firmware="0")))
            nursery.cancel_scope.cancel()
        await trio.sleep_forever()

    try:
        async with dispatching(rt, [target("frozen")], {"10.0.0.5": frozen}):
            await wait_for(lambda: len(connects) >= 2)
            assert "no answer to a WebSocket ping within 10 s" in rt.device_links.links["frozen"].last_error
            # A ping at 15 s, given up at 25 s, reconnect after the first backoff (0.5 s, jittered).
            assert 25.375 <= connects[1] - connects[0] <= 25.5
    finally:
        rt.db.close()


async def test_expired_commands_are_never_delivered(clock: trio.testing.MockClock, runtime: Runtime) -> None:
    sim = DeviceSimulator(device_id="late")
    async with dispatching(runtime, [target("late")]) as lan:
        now = trio.current_time()
        short = await enqueue_many(runtime, [("late", {"n": n}) for n in range(3)], expires_at=now + 5)
        await enqueue_many(runtime, [("late", {"n": n}) for n in range(3, 6)])
        await wait_for(lambda: trio.current_time() > now + 6)  # unreachable past their expiry
        lan.plug("10.0.0.5", 8081, sim.serve_stream)
        await wait_for(lambda: len(sim.accepted) == 3)
        await wait_for(lambda: runtime.device_links.links["late"].acked == 3)
    assert [a.body["n"] for a in sim.accepted] == [3, 4, 5]
    rows = {r.id: r for r in await runtime.db.read(partial(list_commands, device_id="late"))}
    assert {rows[i].state for i in short} == {CommandState.DEAD}
    assert {rows[i].reason for i in short} == {"expired before it could be delivered"}


async def test_graceful_stop_waits_for_acks_in_flight_and_keeps_the_rest(clock: trio.testing.MockClock,
                                                                         runtime: Runtime) -> None:
    slow = DeviceSimulator(device_id="slow", delay_s=1.0)
    async with dispatching(runtime, [target("slow")]) as lan:
        lan.plug("10.0.0.5", 8081, slow.serve_stream)
        await enqueue_many(runtime, [("slow", {"n": n}) for n in range(100)])
        await wait_for(lambda: len(slow.accepted) >= 3)
        stopped_at = trio.current_time()
    # The window (32) was in flight: each was acked before the dispatcher returned.
    took = trio.current_time() - stopped_at
    by_state: dict[CommandState, int] = {}
    for state in (await states(runtime, "slow")).values():
        by_state[state] = by_state.get(state, 0) + 1
    assert len(slow.accepted) == by_state[CommandState.ACKED]
    assert 32 <= by_state[CommandState.ACKED] <= 36 and took <= 34
    assert by_state.get(CommandState.QUEUED, 0) + by_state[CommandState.ACKED] == 100
    assert CommandState.SENT not in by_state  # nothing sent is left unsettled


async def test_links_follow_adoption_changes(clock: trio.testing.MockClock, runtime: Runtime) -> None:
    targets = [target("a", "10.0.0.1")]
    sims = {"a": DeviceSimulator(device_id="a"), "b": DeviceSimulator(device_id="b")}
    async with dispatching(runtime, targets) as lan:
        lan.plug("10.0.0.1", 8081, sims["a"].serve_stream)
        lan.plug("10.0.0.2", 8081, sims["b"].serve_stream)
        lan.plug("10.0.0.3", 8081, sims["b"].serve_stream)
        await enqueue_many(runtime, [("a", {}), ("b", {})])
        await wait_for(lambda: len(sims["a"].accepted) == 1)
        assert list(runtime.device_links.links) == ["a"] and not sims["b"].accepted
        targets.append(target("b", "10.0.0.2"))  # adopted
        runtime.device_changes.notify()
        await wait_for(lambda: len(sims["b"].accepted) == 1)
        targets[:] = [target("b", "10.0.0.3")]  # a rejected, b moved
        runtime.device_changes.notify()
        await wait_for(lambda: list(runtime.device_links.links) == ["b"] and sims["b"].connections == 2)
        await enqueue_many(runtime, [("a", {}), ("b", {})])
        await wait_for(lambda: len(sims["b"].accepted) == 2)
        assert len(sims["a"].accepted) == 1
        checks = {c.name: c for c in await runtime.health.run_all()}
        assert checks["dispatch.outbox"].status is Status.WARN
        assert "a not adopted" in checks["dispatch.outbox"].message
        assert "device.a.channel" not in checks


# --- the hand-off: an enqueued command goes to its link without an outbox read ---------------


class OutboxReads:
    """Counts the reads of the outbox the dispatcher and its links make (the read-back of
    new commands: every device's last seq, a link's new rows)."""

    def __init__(self, runtime: Runtime) -> None:
        self.names: list[str] = []
        db = runtime.db
        read_small, read = db.read_small, db.read

        def name(fn: Callable[..., Any]) -> str:
            return str(getattr(getattr(fn, "func", fn), "__name__", ""))

        async def counted_small(fn: Callable[..., Any]) -> Any:
            self.names.append(name(fn))
            return await read_small(fn)

        async def counted(fn: Callable[..., Any]) -> Any:
            self.names.append(name(fn))
            return await read(fn)

        db.read_small = counted_small  # type: ignore[method-assign]
        db.read = counted  # type: ignore[method-assign]

    def of_new_commands(self) -> int:
        return sum(n in ("last_seqs", "load_unsettled") for n in self.names)


async def test_an_enqueued_command_goes_to_its_link_without_reading_the_outbox(
        clock: trio.testing.MockClock, runtime: Runtime) -> None:
    """enqueue() hands the committed command to the device's link, which sends it with no
    read of the outbox in between (docs/architecture.md §7, "The way of one command")."""
    sim = DeviceSimulator(device_id="p0")
    t = target("p0")
    reads = OutboxReads(runtime)
    async with dispatching(runtime, [t], plugged={t.address: sim.serve_stream}):
        await wait_for(lambda: all(s.phase is DeviceLinkPhase.CONNECTED for s in runtime.device_links.all()))
        before = reads.of_new_commands()
        ids = []
        for n in range(20):
            ids.append((await enqueue(runtime, "p0", "print", {"n": n})).id)
            await wait_for(lambda: len(sim.accepted) == len(ids))
        assert reads.of_new_commands() == before
    assert [a.id for a in sim.accepted] == ids
    assert [a.seq for a in sim.accepted] == list(range(1, 21))
    assert sim.duplicates == 0


async def test_handed_and_read_back_commands_go_out_once_in_order(clock: trio.testing.MockClock,
                                                                  runtime: Runtime) -> None:
    """Commands handed over (one at a time, and many enqueued at once, whose callers resume
    in any order), commands only notified (the order receiver's way: read back), and two
    handed over in reverse order: each device gets every command once, in seq order."""
    sims = {d: DeviceSimulator(device_id=d) for d in ("a", "b")}
    targets = [target("a", "10.0.0.1"), target("b", "10.0.0.2")]
    reads = OutboxReads(runtime)
    async with dispatching(runtime, targets) as lan:
        for t in targets:
            lan.plug(t.address, t.port, sims[t.id].serve_stream)
        await wait_for(lambda: all(s.phase is DeviceLinkPhase.CONNECTED for s in runtime.device_links.all()))
        for round_ in range(1, 6):
            async with trio.open_nursery() as nursery:  # several callers in one group commit
                for n in range(12):
                    nursery.start_soon(partial(enqueue, runtime, "ab"[n % 2], "print", {"r": round_, "n": n}))
            await enqueue_many(runtime, [(d, {"r": round_, "read_back": True}) for d in "ab" for _ in range(3)])

            def two(conn: Any, round_: int = round_) -> list[Any]:
                return [enqueue_in(conn, "a", "print", {"r": round_, "pair": k}) for k in range(2)]

            first, second = await runtime.db.write(two)
            runtime.outbox_changes.hand([second, first])  # the later seq first: it waits for a read
            # Per round: a gets 6 + 3 + 2, b 6 + 3.
            await wait_for(lambda r=round_: len(sims["a"].accepted) == 11 * r and len(sims["b"].accepted) == 9 * r)
        assert reads.of_new_commands() > 0  # the read-back ran for what was not handed over
    for sim, count in ((sims["a"], 55), (sims["b"], 45)):
        assert [a.seq for a in sim.accepted] == list(range(1, count + 1))
        assert sim.duplicates == 0 and sim.connections == 1


async def test_a_link_not_connected_is_not_woken_per_command_and_sends_them_all_in_order_once_up(
        clock: trio.testing.MockClock, runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """New commands for a device the link cannot reach do not wake it (its backoff has
    nothing to do with them: they wait in the outbox); once the device is there, the link
    sends every one of them, and those enqueued after, once, in seq order."""
    links: list[DeviceLink] = []
    made = DeviceLink.__init__

    def keep(self: DeviceLink, *args: Any, **kwargs: Any) -> None:
        made(self, *args, **kwargs)
        links.append(self)

    monkeypatch.setattr(DeviceLink, "__init__", keep)
    sim = DeviceSimulator(device_id="k")
    t = target("k")
    async with dispatching(runtime, [t]) as lan:
        await wait_for(lambda: bool(lan.attempts))
        (link,) = links
        woken = link.poke.version
        for n in range(20):
            await enqueue(runtime, "k", "print", {"n": n})
        runtime.outbox_changes.notify()  # and the read-back way (the order receiver's)
        await wait_for(lambda: len(lan.attempts) >= 3)
        assert link.status.phase is not DeviceLinkPhase.CONNECTED
        assert link.poke.version == woken  # woken by none of them
        assert link.window.pending == 0  # held by none: they wait in the outbox
        lan.plug(t.address, t.port, sim.serve_stream)
        await wait_for(lambda: len(sim.accepted) == 20)
        for n in range(20, 25):
            await enqueue(runtime, "k", "print", {"n": n})
        await wait_for(lambda: link.status.acked == 25)
    assert [a.seq for a in sim.accepted] == list(range(1, 26))
    assert [a.body["n"] for a in sim.accepted] == list(range(25))
    assert sim.duplicates == 0 and sim.connections == 1


async def test_handed_commands_survive_drops_and_a_restart_once_in_order(clock: trio.testing.MockClock,
                                                                          runtime: Runtime,
                                                                          tmp_path: Path) -> None:
    """Commands handed to a link that is down wait in the outbox; a Wi-Fi that drops
    connections mid-stream resends what was in flight; commands handed before a stop and
    enqueued while no dispatcher runs go out after the restart: all once, in seq order."""
    flaky = DeviceSimulator(device_id="f", drop_rate=0.1, seed=3, log_path=tmp_path / "f.jsonl")
    t = target("f")
    async with dispatching(runtime, [t]) as lan:
        for n in range(5):  # the device is not there yet: handed while the link backs off
            await enqueue(runtime, "f", "print", {"n": n})
        lan.plug(t.address, t.port, flaky.serve_stream)
        for n in range(5, 60, 5):
            async with trio.open_nursery() as nursery:
                for k in range(n, n + 5):
                    nursery.start_soon(partial(enqueue, runtime, "f", "print", {"n": k}))
        await wait_for(lambda: len(flaky.accepted) == 60)
        lan.unplug(t.address, t.port)
        for n in range(60, 65):  # handed, never sent: the dispatcher stops first
            await enqueue(runtime, "f", "print", {"n": n})
    for n in range(65, 68):  # no dispatcher: only notified
        await enqueue(runtime, "f", "print", {"n": n})
    assert flaky.drops > 0 and flaky.connections > 2
    again = await open_runtime(runtime.config)
    try:
        again.health.check_timeout_s = 3600.0
        async with dispatching(again, [t], plugged={t.address: flaky.serve_stream}):
            await wait_for(lambda: len(flaky.accepted) == 68)
            await wait_for(lambda: all(s.acked == 8 for s in again.device_links.all()))
    finally:
        again.db.close()
    flaky.close()
    assert [a.seq for a in flaky.accepted] == list(range(1, 69))  # callers at once commit in any order
    assert sorted(a.body["n"] for a in flaky.accepted) == list(range(68))
    assert [a.seq for a in read_log(tmp_path / "f.jsonl")] == list(range(1, 69))


# --- the simulator --------------------------------------------------------------------


def test_simulator_dedupes_across_restarts_through_its_log(tmp_path: Path) -> None:
    log_path = tmp_path / "dev.jsonl"
    first = DeviceSimulator(device_id="d", log_path=log_path)
    first.close()
    log_path.write_text(json.dumps({"id": "c-1", "seq": 1, "kind": "print", "expires_at": None, "body": {},
                                    "received_at": 1.0}) + "\n" + '{"id": "c-2", "se')  # torn by a crash
    again = DeviceSimulator(device_id="d", log_path=log_path)
    assert [a.id for a in again.accepted] == ["c-1"]
    assert log_path.read_text().endswith("}\n")  # the torn line, never acked, is cut
    again.close()


async def test_simulator_refuses_a_client_without_the_subprotocol() -> None:
    sim = DeviceSimulator(device_id="d")
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(run_device_simulator, sim, port=0, bind="127.0.0.1"))
        async with httpx.AsyncClient() as client:
            answer = await client.get(f"http://127.0.0.1:{port}/", headers={
                "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
        assert answer.status_code == 400 and SUBPROTOCOL in answer.text
        nursery.cancel_scope.cancel()


# --- HTTP: the command API and the homepage, on a whole appliance -----------------------


@asynccontextmanager
async def appliance_with(make_config: ConfigFactory, devices: list[dict[str, Any]]) -> AsyncIterator[Runtime]:
    async with running_box(make_config(devices=devices)) as runtime:
        yield runtime


async def test_command_api_and_homepage(make_config: ConfigFactory, tmp_path: Path) -> None:
    sim = DeviceSimulator(device_id="printer-1", log_path=tmp_path / "printer.jsonl", key=device_key("printer-1"))
    async with trio.open_nursery() as sims:
        port = await sims.start(partial(run_device_simulator, sim, port=0, bind="127.0.0.1"))
        async with appliance_with(make_config, [{"id": "printer-1", "kind": "printer", "address": "127.0.0.1",
                                                 "port": port, "name": "Front printer",
                                                 "key": device_key("printer-1").hex()}]) as rt:
            api = f"http://127.0.0.1:{rt.ports['api']}"
            admin = f"http://127.0.0.1:{rt.ports['admin']}"
            auth = {"Authorization": "Bearer test-admin-token-0123456789"}
            async with httpx.AsyncClient(timeout=10) as client:
                url = f"{api}/v1/devices/printer-1/commands"
                answer = await client.post(url, json={"kind": "print", "body": {"text": "hello"}})
                assert answer.status_code == 401
                answer = await client.post(url, headers=auth, json={"kind": "Print!", "body": [], "expires_at": "soon",
                                                                    "colour": "red"})
                assert answer.status_code == 400
                assert answer.json()["errors"] == [
                    "(top level): unknown key(s) colour; a command has kind, body, expires_at, id",
                    "kind: a command kind is a dotted lower-case name of at most 64 characters (e.g. order.created), "
                    "got 'Print!'",
                    "body: must be a JSON object, got list",
                    "expires_at: must be a number of Unix seconds or null, got str",
                ]
                answer = await client.post(url, headers=auth, content=b"{not json")
                assert answer.status_code == 400 and "not valid JSON" in answer.json()["error"]
                answer = await client.post(f"{api}/v1/devices/nobody/commands", headers=auth,
                                           json={"kind": "print", "body": {}})
                assert answer.status_code == 404
                assert (await client.get(url + "?state=queued", headers=auth)).json()["commands"] == []

                answer = await client.post(url, headers=auth, json={"kind": "print", "body": {"text": "hello"},
                                                                    "id": "till-3:receipt-881"})
                assert answer.status_code == 201, answer.text
                made = answer.json()
                assert (made["id"], made["seq"], made["created"], made["state"]) == ("till-3:receipt-881", 1, True,
                                                                                     "queued")
                assert answer.headers["location"] == "/v1/devices/printer-1/commands/till-3:receipt-881"
                again = await client.post(url, headers=auth, json={"kind": "print", "body": {"text": "hello"},
                                                                   "id": "till-3:receipt-881"})
                assert again.status_code == 200 and again.json()["created"] is False
                await bounded(lambda: len(sim.accepted) == 1)
                one = await client.get(f"{url}/till-3:receipt-881", headers=auth)
                await bounded(lambda: rt.device_links.links["printer-1"].acked == 1)
                for _ in range(100):
                    one = await client.get(f"{url}/till-3:receipt-881", headers=auth)
                    if one.json()["command"]["state"] == "acked":
                        break
                    await trio.sleep(0.05)
                assert one.json()["command"]["state"] == "acked"
                assert one.json()["command"]["body"] == {"text": "hello"}
                # The same id again answers the command as stored, in its state now.
                again = await client.post(url, headers=auth, json={"kind": "print", "body": {"text": "hello"},
                                                                   "id": "till-3:receipt-881"})
                assert (again.status_code, again.json()["state"], again.json()["created"]) == (200, "acked", False)
                listing = await client.get(url + "?state=acked", headers=auth)
                assert [c["id"] for c in listing.json()["commands"]] == ["till-3:receipt-881"]
                bad = await client.get(url + "?state=lost&limit=0", headers=auth)
                assert bad.status_code == 400 and len(bad.json()["errors"]) == 2

                home = await client.get(f"{admin}/")
                assert "Device links" in home.text and "Front printer" in home.text
                assert "Send test command" in home.text and "connected" in home.text
                form = await client.post(f"{admin}/devices/test-command",
                                         data={"token": "wrong", "device": "printer-1"})
                assert form.status_code == 401 and "nothing was sent" in form.text
                form = await client.post(f"{admin}/devices/test-command",
                                         data={"token": "test-admin-token-0123456789", "device": "printer-1"})
                assert form.status_code == 303 and form.headers["location"] == "/#device-links"
                await bounded(lambda: len(sim.accepted) == 2)
                assert sim.accepted[1].kind == "ping"
                status = (await client.get(f"{admin}/api/status")).json()
                assert status["device_links"][0]["device_id"] == "printer-1"
                health = (await client.get(f"http://127.0.0.1:{rt.ports['ops']}/health")).json()
                names = {c["name"]: c for c in health["checks"]}
                assert names["device.printer-1.channel"]["status"] == "ok"
                metrics = (await client.get(f"http://127.0.0.1:{rt.ports['ops']}/metrics")).text
                assert 'appliance_device_commands_acked_total{device="printer-1"} 2' in metrics
        sims.cancel_scope.cancel()
    sim.close()


async def test_a_batch_of_commands_is_one_transaction_all_or_nothing(make_config: ConfigFactory,
                                                                     tmp_path: Path) -> None:
    sim = DeviceSimulator(device_id="printer-1", log_path=tmp_path / "printer.jsonl", key=device_key("printer-1"))
    async with trio.open_nursery() as sims:
        port = await sims.start(partial(run_device_simulator, sim, port=0, bind="127.0.0.1"))
        devices = [{"id": "printer-1", "kind": "printer", "address": "127.0.0.1", "port": port,
                    "key": device_key("printer-1").hex()},
                   {"id": "kds-1", "kind": "kds", "address": "127.0.0.1", "port": 9,
                    "key": device_key("kds-1").hex()}]
        async with appliance_with(make_config, devices) as rt:
            url = f"http://127.0.0.1:{rt.ports['api']}/v1/commands"
            auth = {"Authorization": "Bearer test-admin-token-0123456789"}

            async def queued() -> list[str]:
                return await rt.db.read(lambda c: [r[0] for r in c.execute("SELECT id FROM outbox ORDER BY rowid")])

            async with httpx.AsyncClient(timeout=10) as client:
                assert (await client.post(url, json={"commands": []})).status_code == 401
                bad = await client.post(url, headers=auth, json={"commands": [
                    {"device_id": "printer-1", "kind": "print", "body": {}},
                    {"kind": "Print!", "body": []},
                    "text"]})
                assert bad.status_code == 400
                assert bad.json()["errors"] == [
                    "commands[1].device_id: required, a device id",
                    "commands[1].kind: a command kind is a dotted lower-case name of at most 64 characters "
                    "(e.g. order.created), got 'Print!'",
                    "commands[1].body: must be a JSON object, got list",
                    "commands[2]: must be a JSON object, got str",
                ]
                too_many = [{"device_id": "printer-1", "kind": "print", "body": {}}] * (MAX_BATCH + 1)
                assert (await client.post(url, headers=auth, json={"commands": too_many})).status_code == 400
                unknown = await client.post(url, headers=auth, json={"commands": [
                    {"device_id": "printer-1", "kind": "print", "body": {}},
                    {"device_id": "nobody", "kind": "print", "body": {}}]})
                assert unknown.status_code == 404
                assert await queued() == []

                lines = [{"device_id": d, "kind": "order.created", "body": {"line": n}, "id": f"o-7:{d}:{n}"}
                         for n in range(3) for d in ("printer-1", "kds-1")]
                made = await client.post(url, headers=auth, json={"commands": lines})
                assert made.status_code == 201, made.text
                answer = made.json()["commands"]
                assert [(c["id"], c["seq"], c["created"]) for c in answer] == [
                    (f"o-7:{d}:{n}", n + 1, True) for n in range(3) for d in ("printer-1", "kds-1")]
                again = await client.post(url, headers=auth, json={"commands": lines[:2]})
                assert again.status_code == 200 and [c["created"] for c in again.json()["commands"]] == [False, False]

                # An id already used for another device: the whole batch is refused, nothing queued.
                taken = await client.post(url, headers=auth, json={"commands": [
                    {"device_id": "printer-1", "kind": "print", "body": {}, "id": "fresh-1"},
                    {"device_id": "printer-1", "kind": "print", "body": {}, "id": "o-7:kds-1:0"}]})
                assert taken.status_code == 409 and "no command of the batch was queued" in taken.json()["error"]
                assert await queued() == [line["id"] for line in lines]
                await bounded(lambda: len(sim.accepted) == 3)
                assert [c.body for c in sim.accepted] == [{"line": 0}, {"line": 1}, {"line": 2}]
        sims.cancel_scope.cancel()
    sim.close()


class CountingStream(trio.abc.Stream):
    """A device connection that counts the box's writes: the first byte of each (a
    WebSocket frame's FIN and opcode: 0x81 a text frame, a command; 0x89 a ping)."""

    def __init__(self, stream: trio.abc.Stream, writes: list[int]) -> None:
        self.stream, self.writes = stream, writes

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data[:1])[0] if len(data) else -1)
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def test_commands_let_go_together_leave_in_one_write(clock: trio.testing.MockClock, runtime: Runtime) -> None:
    sim = DeviceSimulator(device_id="kds-1", kind="kds")
    writes: list[int] = []
    async with trio.open_nursery() as nursery:
        lan = MemoryLan(nursery)
        lan.plug("10.0.0.5", 8081, sim.serve_stream)

        async def open_counted(host: str, port: int) -> trio.abc.Stream:
            return CountingStream(await lan.open_stream(host, port), writes)

        await nursery.start(partial(run_dispatcher, runtime, open_stream=open_counted,
                                    adopted=lambda conn: [target("kds-1")], clock=trio.current_time,
                                    rng=random.Random(7)))
        await wait_for(lambda: runtime.device_links.links["kds-1"].phase is DeviceLinkPhase.CONNECTED)
        before = len(writes)  # the handshake's
        await enqueue_many(runtime, [("kds-1", {"n": n}) for n in range(20)])
        await wait_for(lambda: len(sim.accepted) == 20)
        assert [c.body["n"] for c in sim.accepted] == list(range(20))
        # Twenty commands, one write. Counted by their frames: under load the MockClock may
        # jump to the link's ping time while a database thread works, and a ping is a write too.
        assert [w for w in writes[before:] if w & 0x0F == 0x1] == [0x81], [hex(w) for w in writes[before:]]
        runtime.stopping.set()
    sim.close()
