"""A listener's idle timer (appliance/services/http.py, ``_IdleTimer``), against real
hypercorn on loopback, and the same bounds in the store API's own HTTP/1.1 loop
(appliance/services/h11_serving.py; each test runs against both): a connection closes once
idle for ``keep_alive_timeout_s`` counted from its last answer, never during a slow answer;
a client that leaves ends its connection at once; a stop closes the idle connections and
lets a request in progress finish; no byte for the read timeout closes it."""

from __future__ import annotations

import math
import socket as stdlib_socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from types import SimpleNamespace
from typing import Any

import outcome
import pytest
import trio
from hypercorn.config import Config as HypercornConfig

from appliance.services.http import ConnectionCaps, _CappedListener, _serve, bind_tcp

BOTH = pytest.mark.parametrize("own_h11", [False, True], ids=["hypercorn", "own_h11"])

KEEP_ALIVE_S = 0.4
SLOW_S = 1.0  # an answer that takes longer than the idle timeout
READ_S = 1.5  # no byte for this long closes the connection (the read timeout; > SLOW_S)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["path"] == "/slow":
        await trio.sleep(SLOW_S)
    if scope["path"] == "/body":  # read the body whole first
        while (await receive()).get("more_body"):
            pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@asynccontextmanager
async def listener(own_h11: bool) -> AsyncIterator[tuple[int, trio.Event, ConnectionCaps]]:
    sock = bind_tcp("127.0.0.1", 0, role="api")
    port = sock.getsockname()[1]
    caps = ConnectionCaps(total=100, per_source=100)
    capped = _CappedListener(trio.SocketListener(trio.socket.from_stdlib_socket(sock)), caps, role="api")
    cfg = HypercornConfig()
    cfg.keep_alive_timeout = KEEP_ALIVE_S
    cfg.read_timeout = READ_S  # type: ignore[assignment]  # a float works
    cfg.graceful_timeout = 5
    cfg.accesslog = None
    stopping = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(_serve, app, cfg, capped, stopping, own_h11=own_h11))
        yield port, stopping, caps
        stopping.set()


async def ask(stream: trio.SocketStream, path: str = "/") -> bytes:
    await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    got = b""
    while not got.endswith(b"\r\n\r\nok"):
        chunk = await stream.receive_some(65536)
        assert chunk, f"closed before the answer: {got!r}"
        got += chunk
    return got


async def closed_after(stream: trio.SocketStream, limit_s: float) -> float:
    """Seconds until the server closes ``stream`` (fails after ``limit_s``)."""
    start = time.monotonic()
    with trio.fail_after(limit_s):
        while await stream.receive_some(65536):
            pass
    return time.monotonic() - start


def connection_tasks() -> int:
    """Tasks serving a connection (hypercorn's ``TCPServer.run`` or ``serve_h11``, under trio's handler)."""
    count = 0
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        count += task.name.endswith("_run_handler")
        todo.extend(child for nursery in task.child_nurseries for child in nursery.child_tasks)
    return count


@BOTH
async def test_an_idle_connection_closes_after_the_timeout_counted_from_its_last_answer(own_h11: bool) -> None:
    async with listener(own_h11) as (port, _, _caps):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            # Requests more often than the timeout, for longer than it: the deadline moves.
            for _ in range(6):
                await ask(stream)
                await trio.sleep(KEEP_ALIVE_S / 2)
            idle = await closed_after(stream, limit_s=5)
        assert KEEP_ALIVE_S / 2 - 0.1 < idle < KEEP_ALIVE_S + 0.5, idle


@BOTH
async def test_a_slow_answer_is_not_cut_by_the_idle_timeout(own_h11: bool) -> None:
    async with listener(own_h11) as (port, _, _caps), await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await ask(stream, "/slow")  # longer than the timeout: the connection is not idle meanwhile
        await ask(stream)  # and it is still open for the next request
        assert await closed_after(stream, limit_s=5) < KEEP_ALIVE_S + 0.5


@BOTH
async def test_a_head_that_never_ends_is_cut_at_the_timeout(own_h11: bool) -> None:
    async with listener(own_h11) as (port, _, _caps), await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"GET / HTTP/1.1\r\nX-Slow: ")
        assert await closed_after(stream, limit_s=5) < KEEP_ALIVE_S + 0.5


@BOTH
async def test_a_client_that_leaves_ends_its_connection_at_once(own_h11: bool) -> None:
    async with listener(own_h11) as (port, _, caps):
        before = connection_tasks()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await ask(stream)
        assert connection_tasks() == before + 1
        await stream.aclose()
        # Well before the idle timeout would close it (hypercorn's own timer kept the
        # connection's task until then).
        with trio.fail_after(KEEP_ALIVE_S / 2):
            while connection_tasks() > before:  # noqa: ASYNC110  (no event tells a task's end)
                await trio.sleep(0.01)
        assert caps.open == 0


@BOTH
async def test_a_stop_closes_idle_connections_and_lets_a_request_in_progress_finish(own_h11: bool) -> None:
    async with listener(own_h11) as (port, stopping, _caps):
        async with await trio.open_tcp_stream("127.0.0.1", port) as idle, \
                await trio.open_tcp_stream("127.0.0.1", port) as busy:
            await ask(idle)
            await busy.send_all(b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await trio.sleep(0.1)
            stopping.set()
            assert await closed_after(idle, limit_s=KEEP_ALIVE_S / 2) < 0.2
            got = b""
            with trio.fail_after(SLOW_S + 2):
                while chunk := await busy.receive_some(65536):
                    got += chunk
        assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"ok"), got


@BOTH
async def test_a_body_whose_bytes_stop_is_cut_at_the_read_timeout_and_one_that_trickles_is_not(own_h11: bool) -> None:
    async with listener(own_h11) as (port, _, _caps):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stopped:
            await stopped.send_all(b"POST /body HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\n12")
            assert READ_S - 0.1 < await closed_after(stopped, limit_s=5) < READ_S + 0.5
        async with await trio.open_tcp_stream("127.0.0.1", port) as trickling:
            # A byte every 0.6 x the timeout, for 2.4 times it in all: the deadline moves with each.
            await trickling.send_all(b"POST /body HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\n\r\n")
            for byte in b"1234":
                await trio.sleep(READ_S * 0.6)
                await trickling.send_all(bytes([byte]))
            got = b""
            with trio.fail_after(5):
                while not got.endswith(b"ok"):
                    chunk = await trickling.receive_some(65536)
                    assert chunk, f"closed before the answer: {got!r}"
                    got += chunk
            assert got.startswith(b"HTTP/1.1 200"), got


class _Arrivals(trio.abc.HalfCloseableStream):
    """A stream whose bytes the test hands over (``arrive``) at the moment it chooses."""

    def __init__(self) -> None:
        self.waiting: trio.lowlevel.Task | None = None

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self.waiting = trio.lowlevel.current_task()
        return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.SUCCEEDED)  # type: ignore[no-any-return]

    def arrive(self, data: bytes) -> None:
        assert self.waiting is not None
        task, self.waiting = self.waiting, None
        trio.lowlevel.reschedule(task, outcome.Value(data))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_bytes_that_come_as_the_read_timeout_passes_are_kept(mock_clock: trio.testing.MockClock) -> None:
    """hypercorn's path (``_TCPServer``): the data handed over in the same instant the read
    deadline passes reaches the protocol; then the timeout still ends the reading."""
    from hypercorn.events import Closed, RawData
    from hypercorn.trio.worker_context import WorkerContext
    from hypercorn.typing import ConnectionState

    from appliance.services.http import _TCPServer

    cfg = HypercornConfig()
    cfg.read_timeout = 10  # type: ignore[assignment]
    stream = _Arrivals()
    server = _TCPServer(app, cfg, WorkerContext(None), ConnectionState({}), stream)
    seen: list[object] = []

    class Protocol:
        async def handle(self, event: object) -> None:
            await trio.lowlevel.checkpoint()  # as hypercorn's does (it awaits inside)
            seen.append(event)

    server.protocol = Protocol()  # type: ignore[assignment]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server._read_data)
        await trio.testing.wait_all_tasks_blocked()
        stream.arrive(b"GET / HTTP/1.1\r\n")  # the reader is now scheduled with the bytes...
        mock_clock.jump(10)  # ...and its deadline passes before it runs
        await trio.testing.wait_all_tasks_blocked()
        assert [e.data for e in seen if isinstance(e, RawData)] == [b"GET / HTTP/1.1\r\n"]
        assert stream.waiting is not None  # reading on, in a new scope
        mock_clock.jump(10)  # nothing more comes: the read timeout
    assert isinstance(seen[-1], Closed)


class _ArrivingConnection(_Arrivals):
    """:class:`_Arrivals` as the listener's connection (its socket's addresses), keeping what is sent."""

    socket = SimpleNamespace(family=stdlib_socket.AF_INET, getpeername=lambda: ("127.0.0.1", 50000),
                             getsockname=lambda: ("127.0.0.1", 8000))

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent.append(bytes(data))
        await trio.lowlevel.checkpoint()


async def test_own_h11_serves_a_head_before_its_deadline_with_none_and_ends_one_that_comes_as_it_passes(
        mock_clock: trio.testing.MockClock) -> None:
    """The store API's loop waits for every head of a connection in one cancel scope, armed
    only while it waits: the app runs with no deadline of the wait's (a slow answer is not
    cut), and a head handed over in the very instant its deadline passes ends the connection
    unserved (the scope, already cancelled, would cancel the app)."""
    from appliance.services.h11_serving import IdleConnections, serve_h11

    cfg = HypercornConfig()
    cfg.keep_alive_timeout = 10
    cfg.read_timeout = 100  # type: ignore[assignment]
    cfg.accesslog = None
    stream = _ArrivingConnection()
    deadlines: list[float] = []

    async def answer(scope: dict[str, Any], receive: Any, send: Any) -> None:
        deadlines.append(trio.current_effective_deadline())
        await trio.sleep(30)  # longer than the head's wait may last
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    head = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_h11, answer, cfg, IdleConnections(), {}, stream)
        for _ in range(2):  # the second wait reuses the connection's scope
            await trio.testing.wait_all_tasks_blocked()
            mock_clock.jump(9)  # within the keep-alive timeout
            stream.arrive(head)
            await trio.testing.wait_all_tasks_blocked()
            mock_clock.jump(30)
            await trio.testing.wait_all_tasks_blocked()
        assert deadlines == [math.inf, math.inf]
        assert [s[:13] for s in stream.sent] == [b"HTTP/1.1 200 "] * 2
        mock_clock.jump(10)  # the third head comes as its deadline passes
        stream.arrive(head)
        await trio.testing.wait_all_tasks_blocked()
        ended = not nursery.child_tasks
        nursery.cancel_scope.cancel()
    assert ended and len(deadlines) == 2 and len(stream.sent) == 2
