"""One HTTP listener: a socket bound by us, served by hypercorn's trio worker, within bounds.

We bind the socket ourselves (rather than letting hypercorn do it) so a port that cannot
be bound stops start-up with one clear :class:`BindError` naming the port, the service and
the fix, instead of an exception group from deep inside the server.

Bounds (docs/hardening.md), so that nothing a LAN client does can stop the box:

- **Connections**: at most ``max_connections_per_source`` from one address (the box's own
  127.0.0.1 and ::1 excepted): one more is accepted and reset at once, so it takes nothing
  and the backlog never fills with it. At
  most ``[http] max_connections`` per listener (fewer if the process's descriptor limit
  cannot hold them all): at that cap the listener stops accepting until one closes, and new
  connections wait in the kernel's backlog. ``accept`` failing for want of descriptors
  (EMFILE...) pauses that listener briefly, logged once a minute, and never raises.
- **Time**: the request head must arrive within ``keep_alive_timeout_s`` (hypercorn's idle
  timer runs from accept until the head is complete, and between requests); no byte for
  ``read_timeout_s`` closes the connection; bodies are bounded by the apps' readers.
- **Protocol**: HTTP/1.1 only. An ``Upgrade: h2c`` request or the HTTP/2 preface closes
  the connection unanswered: hypercorn would otherwise switch to HTTP/2, which no client
  of the box needs and which multiplies what one connection can ask for.

Graceful stop: when ``runtime.stopping`` is set we stop accepting, let in-flight requests
finish for up to ``supervisor.shutdown_deadline_s``, then cancel them. The serving loop is
hypercorn's ``worker_serve`` less what the box does not use (TLS, QUIC, statsd, request
recycling), so that the listener it serves is ours. The store API's connections are served
by our own HTTP/1.1 loop (``services/h11_serving.py``) with the same bounds from the same
Config; the other listeners' by hypercorn's protocol (docs/store-api.md, "Speed").
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import re
import resource
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from functools import partial
from math import inf
from typing import Any, Final

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState, TaskGroup
from hypercorn.utils import ShutdownError, raise_shutdown, wrap_app
from starlette.types import ASGIApp

from appliance.config import LISTENER_ROLES
from appliance.services.guard import allowed_host_names, guard
from appliance.services.h11_serving import IdleConnections, serve_h11
from appliance.services.runtime import Runtime

__all__ = ["BindError", "ConnectionCaps", "asks_for_http2", "bind_tcp", "effective_connection_cap", "guarded_app",
           "raise_descriptor_limit", "run_listener"]

log = logging.getLogger(__name__)

# Connections waiting for accept(); the shop's devices are tens, not thousands.
BACKLOG = 128
# Descriptors kept back from the listeners' caps for everything else (database, sockets to
# devices and the cloud, discovery, logs, subprocesses).
RESERVED_DESCRIPTORS: Final = 256
# The soft descriptor limit the process asks for at start (the unit sets LimitNOFILE to it).
WANTED_DESCRIPTORS: Final = 8192
# accept() without descriptors: wait this long before trying again.
_ACCEPT_PAUSE_S: Final = 0.1
_LOG_EVERY_S: Final = 60.0
# Listeners whose requests are long streams (event subscriptions, media downloads): a limit on
# requests in progress would make the next subscriber wait for another to leave.
_STREAMING_ROLES: Final = frozenset({"events", "media"})
# The box's own loopback address: its health checks, a technician's tools on the box. No
# LAN peer can send from it, so the per-address cap (a defence against LAN peers) spares it.
_THE_BOX_ITSELF: Final = frozenset({"127.0.0.1", "::1"})
_NO_DESCRIPTORS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# HTTP/2 by upgrade (RFC 7540 §3.2) or by prior knowledge (§3.4), anywhere in the stream.
_HTTP2: Final = re.compile(rb"(?i)\nupgrade:[^\r\n]*h2c|(?:^|\n)PRI \* HTTP/2")
_HTTP2_TAIL: Final = 64  # bytes kept between reads so a match split by a read is seen


def asks_for_http2(seen: bytes) -> bool:
    """Whether ``seen`` (a read, after the tail of the one before) asks for HTTP/2."""
    # The pattern is slow per byte (case-insensitive, tried at every line start: 6 us on a
    # signed request's head, 2 on a bearer's); it can only match where one of its literals
    # is, and looking for those first costs a tenth of that.
    lowered = seen.lower()
    return (b"h2c" in lowered or b"pri * http/2" in lowered) and _HTTP2.search(seen) is not None


# Listeners served by our own HTTP/1.1 loop on h11 (services/h11_serving.py) instead of
# hypercorn's protocol: the store API, whose small JSON answers it made most of the work.
_OWN_H11_ROLES: Final = frozenset({"api"})


class BindError(Exception):
    """A listener's port cannot be bound. The message is one line for a person."""

    def __init__(self, *, role: str, host: str, port: int, cause: OSError) -> None:
        self.role, self.host, self.port, self.cause = role, host, port, cause
        if cause.errno == errno.EACCES:
            fix = ("ports below 1024 need root or CAP_NET_BIND_SERVICE; run as a normal user with "
                   "--port-offset 10000 (or set [lan.ports])")
        elif cause.errno == errno.EADDRINUSE:
            fix = (f"another program holds it (`ss -ltnp 'sport = :{port}'` shows which); stop it, or use "
                   "--port-offset N or [lan.ports]")
        elif cause.errno == errno.EADDRNOTAVAIL:
            fix = "the address is not on this machine; check [lan] bind"
        else:
            fix = "check [lan] bind and [lan.ports]"
        super().__init__(f"cannot listen on {host}:{port} for the {role} service: "
                         f"{cause.strerror or cause}; {fix}")


def bind_tcp(host: str, port: int, *, role: str, user_timeout_s: float | None = None) -> socket.socket:
    """``user_timeout_s``: TCP_USER_TIMEOUT, inherited by accepted sockets: the kernel drops
    a connection whose sent data stays unacknowledged that long, a peer that stopped
    reading included (a send blocked in hypercorn cannot be cancelled: it is shielded)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if user_timeout_s is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, round(user_timeout_s * 1000)))
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise BindError(role=role, host=host, port=port, cause=exc) from exc
    return sock


def raise_descriptor_limit(wanted: int = WANTED_DESCRIPTORS) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (never above the hard limit, never
    down); returns the soft limit in force. systemd's default soft limit is 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, target, exc)
    return soft


def effective_connection_cap(configured: int, listeners: int = len(LISTENER_ROLES)) -> int:
    """``configured``, lowered so every listener at its cap still leaves descriptors over."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(8, min(configured, (soft - RESERVED_DESCRIPTORS) // max(1, listeners)))


class ConnectionCaps:
    """Open connections of one listener: in all, and by source address."""

    def __init__(self, *, total: int, per_source: int) -> None:
        self.total, self.per_source = total, per_source
        self.open = 0
        self.by_source: collections.Counter[str] = collections.Counter()
        self.refused = 0
        self._room = trio.lowlevel.ParkingLot()

    async def wait_for_room(self) -> None:
        """Until a connection may be accepted: at the cap, new ones wait in the kernel's
        backlog (and clients retry their SYNs) instead of being refused."""
        while self.open >= self.total:
            await self._room.park()

    def admit(self, source: str) -> bool:
        if self.by_source[source] >= self.per_source and source not in _THE_BOX_ITSELF:
            self.refused += 1
            return False
        self.open += 1
        self.by_source[source] += 1
        return True

    def release(self, source: str) -> None:
        self.open -= 1
        self.by_source[source] -= 1
        if self.by_source[source] <= 0:
            del self.by_source[source]
        self._room.unpark_all()


class _Connection(trio.abc.HalfCloseableStream):
    """An admitted connection: gives its place back when closed; refuses HTTP/2."""

    def __init__(self, stream: trio.SocketStream, caps: ConnectionCaps, source: str) -> None:
        self.socket = stream.socket  # hypercorn reads the addresses from it
        self._stream, self._caps, self._source = stream, caps, source
        self._released = False
        self._tail = b"\n"  # as if a line had just ended: the first request line is checked too

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self._stream.receive_some(max_bytes)
        if not data:
            # The client has gone. hypercorn ends the connection only when its idle timer
            # does (keep_alive_timeout_s later), holding the descriptor and the place that
            # long: a crowd that connects and leaves would keep the listener at its cap, and
            # after descriptor exhaustion the backlog would drain a few per second. Give
            # both back now; hypercorn's own close later finds the stream closed.
            await self.aclose()
            return data
        seen = self._tail + data
        if asks_for_http2(seen):
            raise trio.BrokenResourceError("HTTP/2 is not served here")
        self._tail = seen[-_HTTP2_TAIL:]
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        if not self._released:
            self._released = True
            self._caps.release(self._source)
        await self._stream.aclose()


class _CappedListener(trio.abc.Listener[_Connection]):
    def __init__(self, inner: trio.SocketListener, caps: ConnectionCaps, *, role: str) -> None:
        self._inner, self._caps, self._role = inner, caps, role
        self._last_log = -_LOG_EVERY_S
        self._quiet = 0

    async def accept(self) -> _Connection:
        while True:
            await self._caps.wait_for_room()
            try:
                stream = await self._inner.accept()
            except OSError as exc:
                if exc.errno not in _NO_DESCRIPTORS:
                    raise
                self._note(f"out of descriptors ({exc.strerror}); pausing accept for {_ACCEPT_PAUSE_S:g} s")
                await trio.sleep(_ACCEPT_PAUSE_S)
                continue
            source = _source_of(stream)
            if self._caps.admit(source):
                return _Connection(stream, self._caps, source)
            _reset(stream)
            self._note(f"connection from {source} refused: {self._caps.by_source[source]} open from that address "
                       f"(cap {self._caps.per_source})")

    async def aclose(self) -> None:
        await self._inner.aclose()

    def _note(self, message: str) -> None:
        # One line a minute at most, with how many were not logged: an attack must not fill the log.
        now = time.monotonic()
        if now - self._last_log < _LOG_EVERY_S:
            self._quiet += 1
            return
        more = f" ({self._quiet} more like it in the last minute)" if self._quiet else ""
        log.warning("%s listener: %s%s", self._role, message, more)
        self._last_log, self._quiet = now, 0


def _source_of(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return "?"


def _reset(stream: trio.SocketStream) -> None:
    # SO_LINGER 0: the close sends a reset at once and leaves no TIME_WAIT behind.
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


class _IdleTimer:
    """A connection's idle timer, in place of hypercorn's ``TrioSingleTask`` (same two
    methods): the connection closes when no request head is under way for
    ``keep_alive_timeout_s`` (from accept to the first head's end, and between requests) or
    when the server stops while it is idle.

    hypercorn's own timer cancels its task when a head is complete and starts a new task
    (``nursery.start``, a lock, a cancellation) when the answer is done: under 50 keep-alive
    clients that was 15-20% of the event loop's time (docs/store-api.md, "Speed"). Here one
    task per connection waits in a cancel scope whose deadline :meth:`restart` moves to
    ``now + keep_alive_timeout_s`` and :meth:`stop` to infinity; :meth:`end` (the
    connection is over) ends the task without closing anything."""

    def __init__(self, keep_alive_s: float, terminated: Callable[[], Awaitable[None]],
                 close: Callable[[], Awaitable[None]]) -> None:
        self._keep_alive_s, self._terminated, self._close = keep_alive_s, terminated, close
        self._scope = trio.CancelScope()
        self._started = self._ended = False

    async def restart(self, task_group: TaskGroup, action: Any) -> None:
        """Idle from now (hypercorn's ``action`` is its own timer's body: not needed here)."""
        self._scope.deadline = trio.current_time() + self._keep_alive_s
        if not self._started:
            self._started = True
            task_group.spawn(self._watch)

    async def stop(self) -> None:
        """A request head is complete: no idle deadline until its answer is done."""
        self._scope.deadline = inf

    def end(self) -> None:
        self._ended = True
        self._scope.cancel()

    async def _watch(self) -> None:
        with self._scope:
            await self._terminated()
            if self._scope.deadline == inf:
                # The server stops while a request is in progress: hypercorn closes the
                # connection after its answer (it does not go idle again); wait for end().
                await trio.sleep_forever()
        if not self._ended:
            with trio.CancelScope(shield=True):
                await self._close()


class _TCPServer(TCPServer):
    """hypercorn's connection with :class:`_IdleTimer` as its idle timer."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._idle = _IdleTimer(self.config.keep_alive_timeout, self.context.terminated.wait,
                                self._initiate_server_close)
        self.idle_task = self._idle  # type: ignore[assignment]

    async def protocol_send(self, event: Event) -> None:
        if not isinstance(event, RawData):
            await super().protocol_send(event)
            return
        if not event.data:
            # The empty write that ends every Content-Length answer (h11's EndOfMessage):
            # nothing to send, and a lock, a shielded scope and a send's checkpoints to skip.
            return
        # As hypercorn's, but the send lock, when free, is taken without a checkpoint:
        # ``async with`` yields to the scheduler even then, a pass of the run queue for each
        # of the three writes of every answer (the lock's line alone was 2.7% of the event
        # loop's samples under 50 clients); the send itself is still a checkpoint.
        try:
            self.send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self.send_lock.acquire()
        try:
            try:
                with trio.CancelScope(shield=True):
                    await self.stream.send_all(event.data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self.protocol.handle(Closed())
        finally:
            self.send_lock.release()

    async def _read_data(self) -> None:
        # As hypercorn's, but the read timeout is one cancel scope whose deadline moves
        # before each receive (and to infinity while the data is handled) rather than a
        # ``fail_after`` (a context manager made by a generator, and a new scope) per receive.
        try:
            while await self._read_in_one_scope():
                pass
            await self.protocol.handle(Closed())
        finally:
            # Nothing more will be read: the connection ends once a request in progress is
            # answered; the timer has nothing left to time.
            self._idle.end()

    async def _read_in_one_scope(self) -> bool:
        """Receive and handle data until the peer leaves or sends nothing for the read timeout
        (False), or until the deadline passes just as data comes (True: that data is
        handled here and the caller reads on in a new scope, a cancelled one staying so)."""
        quiet_s = self.config.read_timeout or inf
        with trio.CancelScope() as reading:
            while True:
                reading.deadline = trio.current_time() + quiet_s
                try:
                    data = bytes(await self.stream.receive_some(MAX_RECV))
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    return False
                reading.deadline = inf
                if reading.cancel_called:
                    break
                await self.protocol.handle(RawData(data))
                if not data:
                    return False
        if reading.cancelled_caught:
            return False
        await self.protocol.handle(RawData(data))
        return bool(data)

    async def _close(self) -> None:
        self._idle.end()
        await super()._close()


def hypercorn_config(runtime: Runtime) -> HypercornConfig:
    http = runtime.config.http
    cfg = HypercornConfig()
    cfg.graceful_timeout = runtime.config.supervisor.shutdown_deadline_s
    cfg.keep_alive_timeout = http.keep_alive_timeout_s
    cfg.read_timeout = http.read_timeout_s  # type: ignore[assignment]  # a float works: it feeds trio.fail_after
    cfg.h11_max_incomplete_size = 16 * 1024  # the request line and headers, together
    cfg.max_app_queue_size = 10  # body chunks queued for the app
    cfg.alpn_protocols = ["http/1.1"]
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("appliance.http")
    # The apps enforce body limits per route; this bounds a single WebSocket message.
    cfg.websocket_max_message_size = http.max_body_bytes
    cfg.backlog = BACKLOG
    return cfg


async def _serve(app: ASGIApp, cfg: HypercornConfig, listener: _CappedListener, stopping: trio.Event, *,
                 own_h11: bool = False, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """``own_h11``: connections served by :func:`~appliance.services.h11_serving.serve_h11`
    rather than hypercorn's (the store API's; lifespan and stop are hypercorn's all the same)."""
    wrapped = wrap_app(app, cfg.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(wrapped, cfg, lifespan_state)
    context = WorkerContext(None)
    idle = IdleConnections()
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        handler: Callable[[_Connection], Awaitable[object]]
        if own_h11:
            handler = partial(serve_h11, app, cfg, idle, lifespan_state.copy())  # type: ignore[arg-type]
        else:
            handler = partial(_TCPServer, wrapped, cfg, context, ConnectionState(lifespan_state.copy()))
        async with trio.open_nursery() as connections:
            task_status.started()
            try:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(raise_shutdown, stopping.wait)
                    accepting.start_soon(partial(trio.serve_listeners, handler, [listener],
                                                 handler_nursery=connections))
            except* ShutdownError:
                pass
            finally:
                await context.terminated.set()
                idle.close_all()
                connections.cancel_scope.deadline = trio.current_time() + cfg.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


def guarded_app(runtime: Runtime, app: ASGIApp, *, role: str) -> ASGIApp:
    """``app`` behind the guard (services/guard.py) as the listener of ``role`` serves it."""
    http = runtime.config.http
    return guard(app, names=allowed_host_names(http.allowed_hosts), budget=runtime.body_budget,
                 max_body_bytes=http.max_body_bytes, wait_s=http.body_timeout_s,
                 requests=None if role in _STREAMING_ROLES else trio.CapacityLimiter(http.max_requests_in_progress))


async def run_listener(
    runtime: Runtime,
    app: ASGIApp,
    *,
    role: str,
    user_timeout_s: float | None = None,
    quiet_clients: bool = False,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on the port of ``role`` until ``runtime.stopping``; started() gives the port.

    ``quiet_clients``: a client may rightly send nothing for long (an event-stream
    subscriber over SSE), so ``read_timeout_s`` does not apply; the app bounds its idle
    connections itself and ``user_timeout_s`` cuts the dead ones."""
    host = runtime.config.lan.bind
    port = runtime.ports.of(role)
    sock = bind_tcp(host, port, role=role, user_timeout_s=user_timeout_s)
    bound = sock.getsockname()[1]
    http = runtime.config.http
    caps = ConnectionCaps(total=effective_connection_cap(http.max_connections),
                          per_source=http.max_connections_per_source)
    listener = _CappedListener(trio.SocketListener(trio.socket.from_stdlib_socket(sock)), caps, role=role)
    guarded = guarded_app(runtime, app, role=role)
    try:
        async with trio.open_nursery() as nursery:
            cfg = hypercorn_config(runtime)
            if quiet_clients:
                cfg.read_timeout = None
            await nursery.start(partial(_serve, guarded, cfg, listener, runtime.stopping,
                                        own_h11=role in _OWN_H11_ROLES))
            runtime.ports.bind(role, bound)
            log.info("listening on %s:%d for %s (at most %d connections, %d per address)", host, bound, role,
                     caps.total, caps.per_source)
            task_status.started(bound)
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()
