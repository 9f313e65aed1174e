"""One device's link on the device channel (TCP 8081): connect, push, reconnect.

The box is the WebSocket client (trio-websocket) of ``ws://<address>:<port>/`` with the
subprotocol ``chub.device.v1``. A link owns one :class:`~appliance.protocol.channel.SendWindow`
for its whole life and loops: connect (bounded by ``connect_timeout_s``), exchange
messages, and on any failure back off (capped, jittered, per device) and connect again.
The window keeps what was in flight, so everything unacknowledged is sent again in order.

Per connection, three tasks: the writer (the only task that sends commands; it also loads
commands from the outbox, runs the window's timers and hands records to the recorder;
every command the window lets go at once leaves in one TCP write, see :class:`_Cork`),
the reader (device messages into the window) and the pinger (a WebSocket ping every
``ping_interval_s``; no pong within ``ping_timeout_s`` drops the link).

Teardown: on any error or cancellation the TCP stream itself is closed, never the polite
WebSocket close (a close after a send cancelled mid-frame corrupts the stream with
trio-websocket 0.12: docs/architecture.md §7). Only a graceful stop, after the writer has finished every send and
every command in flight is settled, closes politely, within a short bound.

A device that sends garbage, the wrong hello, or nothing at all is disconnected and backs
off like a device that cannot be reached; nothing it does raises out of :meth:`DeviceLink.run`
except a bug. trio-websocket parses the device's handshake and frames in a reader task of
its own, in the nursery we hand it, and some malformed answers make that task raise h11's or
wsproto's errors (a ``101`` without ``Upgrade``, a wrong accept key, an HTTP response that is
not one): :class:`_ContainedNursery` turns whatever that task raises into
:class:`ChannelProtocolError`, so a device's bytes can never reach the supervisor's crash count.

The hello (docs/device-api.md): for a device with a key (``LinkTarget.key``), the box
answers the device's hello with its nonce and its proof of the key, then waits for the
device's proof; no command goes out before it checks. An impostor at the device's address
fails there (``HelloRefused``: "failed authentication ... (impostor or wrong key)") and
gets nothing. Only a device adopted before enrollment (``key`` None) skips the proofs.
"""

from __future__ import annotations

import enum
import errno
import math
import os
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Final

import attrs
import h11
import trio
import wsproto.utilities
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError, WebSocketConnection, wrap_client_stream

from appliance.config import DispatchConfig
from appliance.protocol import identity as idp
from appliance.protocol.backoff import Backoff
from appliance.protocol.channel import Acked, ChannelState, Dead, Record, SendWindow, Sent
from appliance.protocol.channel_codec import (
    MAX_DEVICE_MESSAGE_BYTES,
    SUBPROTOCOL,
    Auth,
    ChannelError,
    ChannelProtocolError,
    Command,
    Hello,
    HelloRefused,
    LinkStalled,
    encode_box_auth,
    encode_command,
    parse_device_message,
)
from appliance.protocol.text import Text
from appliance.services.metrics import Metrics
from appliance.services.signal import ChangeSignal
from appliance.storage import Database
from appliance.storage.outbox import load_unsettled

__all__ = ["DeviceLink", "DeviceLinkPhase", "LinkNote", "LinkStatus", "LinkTarget", "OpenStream", "describe_failure",
           "open_tcp"]

OpenStream = Callable[[str, int], Awaitable[trio.abc.Stream]]
Clock = Callable[[], float]

# Records handed to the recorder in one batch at most; a batch is one transaction.
_RECORD_BATCH: Final = 256
# While commands are in flight, their records wait for the window to empty (a command's
# sent and acked records then share one commit, not one each) at most this long.
_RECORD_HOLD_S: Final = 0.1
# A graceful close waits this long for the device's close frame, then closes the stream.
_POLITE_CLOSE_S: Final = 2.0
# Commands gathered for one TCP write at most (see _Cork): a window's worth of small
# commands; a big one goes out with what was gathered before it.
_CORK_MAX_BYTES: Final = 64 * 1024
# Closing a stream is local; the bound only guards against a stuck transport.
_STREAM_CLOSE_S: Final = 1.0
# What a failed connection may raise; anything else is a bug and crashes the dispatcher.
# h11's and wsproto's protocol errors come from parsing what the device sent (our own calls
# can meet them too when the device's bytes left the connection in a state it cannot leave).
EXPECTED: Final = (OSError, trio.TooSlowError, trio.BrokenResourceError, ConnectionClosed, HandshakeError,
                   ChannelError, h11.ProtocolError, wsproto.utilities.ProtocolError)


class _ContainedNursery:
    """The nursery handed to trio-websocket: its tasks (the reader that parses the device's
    handshake and frames) raise nothing but the library's own ``HandshakeError`` (which
    includes ``ConnectionRejected``) and ``ConnectionClosed``, or :class:`ChannelProtocolError`
    for anything else; cancellation passes through. The tasks run in, and are cancelled with, the wrapped nursery."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object, name: object = None) -> None:
        async def contained() -> None:
            try:
                await fn(*args)
            except (HandshakeError, ConnectionClosed):
                raise  # the library's own words for a refused or closed connection: kept as they are
            except Exception as exc:  # the library's reader parses the peer's bytes: any failure is the peer's
                raise ChannelProtocolError(f"its WebSocket handshake or frames could not be read "
                                           f"({type(exc).__name__}: {exc})") from exc

        self._nursery.start_soon(contained, name=name or fn)


class _Cork(trio.abc.Stream):
    """The device's byte stream, with the writer's commands gathered into one write.

    Between :meth:`cork` and :meth:`uncork`, ``send_all`` only appends to a buffer (bounded
    by :data:`_CORK_MAX_BYTES`: beyond it the buffer is written at once); ``uncork`` writes
    it all. One write per command was the device path's largest per-message cost (a send
    system call and the peer's wake-up each: ``scripts/bench dispatch``, profiled); when
    acks free several slots of the window together, their commands now share one. Every
    other write (trio-websocket's pongs and closes) passes straight through while uncorked,
    and waits for the uncork, which follows at once, while corked. Closing closes the stream.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._corked = False
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        # One write at a time on the stream: the uncork's write is not under trio-websocket's
        # own send lock, and a pong or ping may come while it is in progress (trio raises
        # BusyResourceError for two sends at once on one stream).
        self._write_lock = trio.StrictFIFOLock()

    def cork(self) -> None:
        self._corked = True

    async def uncork(self) -> None:
        self._corked = False
        await self._write_pending()

    async def _write_pending(self) -> None:
        # The lock is nearly always free: taken then without a round of the scheduler, so
        # the commands leave at once (trio-websocket's own lock, taken for each command,
        # already made the writer a checkpoint; the socket's send is one too).
        try:
            self._write_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._write_lock.acquire()
        try:
            if self._pending:
                data = b"".join(self._pending)
                self._pending, self._pending_bytes = [], 0
                await self._stream.send_all(data)
        finally:
            self._write_lock.release()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not self._corked:
            async with self._write_lock:
                await self._stream.send_all(data)
            return
        # Only buffered: no round of the scheduler either (the caller, trio-websocket's
        # send, took its lock, a checkpoint, just before).
        self._pending.append(bytes(data))
        self._pending_bytes += len(data)
        if self._pending_bytes >= _CORK_MAX_BYTES:
            await self._write_pending()

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._stream.aclose()


async def open_tcp(host: str, port: int) -> trio.abc.Stream:
    """The production connect: a plain TCP stream to the device (the LAN is the device's)."""
    return await trio.open_tcp_stream(host, port)


class DeviceLinkPhase(enum.StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKING_OFF = "backing_off"  # waiting out the backoff after a failure
    STOPPED = "stopped"


@attrs.frozen(kw_only=True)
class LinkTarget:
    """What a link needs to know of a registry device."""

    id: str
    kind: str
    name: str
    address: str
    port: int
    # The device key the hello proves; None only for a device adopted before enrollment.
    key: bytes | None = attrs.field(default=None, repr=False)


@attrs.define(kw_only=True)
class LinkStatus:
    """What the homepage, /api/status and the health checks show of one link."""

    target: LinkTarget
    phase: DeviceLinkPhase = DeviceLinkPhase.CONNECTING
    connected_since: float | None = None
    firmware: str = ""
    last_error: str = ""
    last_fix: str = ""
    last_error_at: float | None = None
    last_ack_at: float | None = None
    next_attempt_at: float | None = None
    failures: int = 0  # in a row; 0 once a connection proves itself
    in_flight: int = 0
    held: int = 0  # commands loaded and not settled (in flight or next to go)
    sent: int = 0
    acked: int = 0
    dead: int = 0

    def as_dict(self) -> dict[str, object]:
        t = self.target
        return {"device_id": t.id, "name": t.name, "kind": t.kind, "address": t.address, "port": t.port,
                "state": str(self.phase), "connected": self.phase is DeviceLinkPhase.CONNECTED,
                "connected_since": self.connected_since, "firmware": self.firmware,
                "last_error": self.last_error, "last_error_at": self.last_error_at, "fix": self.last_fix,
                "last_ack_at": self.last_ack_at, "next_attempt_at": self.next_attempt_at,
                "failures": self.failures, "in_flight": self.in_flight, "held": self.held,
                "sent": self.sent, "acked": self.acked, "dead": self.dead}


def _endpoint(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def describe_failure(exc: BaseException, address: str, port: int, connect_timeout_s: float) -> tuple[str, str]:
    """``(what happened, what a person should do)`` for a failed link, in plain words."""
    where = _endpoint(address, port)
    on_and_running = Text("check the device is on and its app running")
    not_its_app = Text("update the device's app, or check that the address belongs to this device")
    if isinstance(exc, trio.TooSlowError):
        return (Text("cannot reach {where}: no answer within {seconds} s", where=where,
                     seconds=format(connect_timeout_s, "g")),
                Text("check the device is on and its app running, on this network, at this address"))
    if isinstance(exc, OSError):
        if exc.errno is None and isinstance(exc.__cause__, BaseExceptionGroup):
            # trio's "all attempts to connect to ... failed": the attempts' own errors are
            # its cause; one errno shared by all of them says it better.
            numbers = {getattr(e, "errno", None) for e in exc.__cause__.exceptions}
            if len(numbers) == 1 and (number := numbers.pop()) is not None:
                exc = OSError(number, os.strerror(number))
        if exc.errno == errno.ECONNREFUSED:
            return Text("cannot reach {where}: connection refused", where=where), on_and_running
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return (Text("cannot reach {where}: no route to host", where=where),
                    Text("check the device is on and on the shop's network; check its address"))
        return Text("cannot reach {where}: {error}", where=where, error=exc.strerror or str(exc)), on_and_running
    if isinstance(exc, ConnectionRejected):
        return (Text("{where} refused the device channel (HTTP {status})", where=where, status=exc.status_code),
                Text("the app at that address does not speak {subprotocol}; check the device's address and app "
                     "version", subprotocol=SUBPROTOCOL))
    if isinstance(exc, HelloRefused):
        return (Text("failed authentication at {where} (impostor or wrong key)", where=where),
                Text("check that the device at that address is the one adopted; a device that was reset must enroll "
                     "again and its new key be accepted on the homepage"))
    if isinstance(exc, ChannelProtocolError):
        return Text("{where} broke the device protocol: {error}", where=where, error=str(exc)), not_its_app
    if isinstance(exc, h11.ProtocolError | wsproto.utilities.ProtocolError):
        return Text("{where} broke the WebSocket protocol: {error}", where=where, error=str(exc)), not_its_app
    if isinstance(exc, LinkStalled):
        return (Text("{where} stopped answering: {error}", where=where, error=str(exc)),
                Text("check the device's app is not frozen and its Wi-Fi signal"))
    again = Text("check the device's app; the box reconnects by itself")
    if isinstance(exc, ConnectionClosed):
        reason = exc.reason
        if reason is None:
            return Text("the connection to {where} closed", where=where), again
        detail = f"{reason.code}{': ' + reason.reason if reason.reason else ''}"
        return Text("the connection to {where} closed (code {detail})", where=where, detail=detail), again
    return Text("{where}: {error}", where=where, error=f"{type(exc).__name__}: {exc}"), on_and_running


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


@attrs.frozen(kw_only=True)
class LinkNote:
    """The link went up or down: logged by the recorder for the event stream (its ``type``
    is ``device.link_up`` or ``device.link_down``)."""

    type: str
    device_id: str
    at: float
    data: dict[str, str]


class DeviceLink:
    """The link to one device. :meth:`run` until cancelled, or until :meth:`stop` and the
    commands in flight are settled. Records go to ``records`` (the recorder's channel),
    and so do its :class:`LinkNote` s (going up and down, for the event stream); the link
    never writes the database itself."""

    def __init__(
        self,
        target: LinkTarget,
        *,
        config: DispatchConfig,
        db: Database,
        records: trio.MemorySendChannel[list[Record | LinkNote]],
        metrics: Metrics,
        open_stream: OpenStream = open_tcp,
        clock: Clock = time.time,
        rng: random.Random | None = None,
        ask_ticket: Callable[[str], None] = lambda device_id: None,
    ) -> None:
        self.target = target
        self._ask_ticket = ask_ticket  # the device's button asked for the status ticket
        self.status = LinkStatus(target=target)
        self.poke = ChangeSignal()  # new commands known, acks in, stop asked
        self.known_seq: int | None = None  # the outbox's last seq for this device, as last heard
        self._config = config
        self._db = db
        self._records = records
        self._metrics = metrics
        self._open_stream = open_stream
        self._clock = clock
        self._rng = rng or random.Random()
        self._cursor = 0  # outbox rows up to this seq were read (or taken) already
        self._loading = False  # a read of the outbox is under way (see take)
        self._writing = False  # the writer runs (connected): new commands are its to send
        self._notes: list[LinkNote] = []  # going up or down, for the recorder to log
        self._stop = trio.Event()
        self._session_scope: trio.CancelScope | None = None
        self.window = SendWindow(device_id=target.id, window=config.window, hello_timeout_s=config.hello_timeout_s,
                                 ack_timeout_s=config.ack_timeout_s, retry_initial_s=config.retry_initial_s,
                                 retry_max_s=config.retry_max_s)
        self._load_at_room = max(1, self.window.capacity // 4)

    # --- what the dispatcher calls -------------------------------------------------

    def new_commands(self, last_seq: int) -> None:
        """The outbox gave this device commands up to ``last_seq``. Only a running writer
        is woken: a link connecting or backing off has nothing to do with them until its
        writer starts, which reads the outbox past what it holds as its first step."""
        if self.known_seq is None or last_seq > self.known_seq:
            self.known_seq = last_seq
            if self._writing:
                self.poke.notify()

    def take(self, command: Command) -> None:
        """``command`` was just committed to this device's outbox. If it is the very next row
        the link would read (its seq follows the rows read so far) and the window has room,
        the window holds it at once: no read of the outbox stands between its commit and its
        send. Otherwise (no writer running: not connected; rows not yet read before it, a full
        window, a read under way, a stop) it is left to the outbox read, as :meth:`new_commands`. Either way it is sent
        once, in seq order; after a reconnect or a restart the outbox read finds it as any."""
        window = self.window
        if (self._writing and command.seq == self._cursor + 1 and command.seq > window.last_seq
                and window.room() > 0 and not self._loading and not self._stop.is_set()):
            window.offer((command,))
            self._cursor = command.seq
        self.new_commands(command.seq)

    def stop(self) -> None:
        """Graceful stop: send nothing new; return once what is in flight is settled."""
        self._stop.set()
        self.window.drain()
        if self.window.idle and self._session_scope is not None:
            self._session_scope.cancel()  # not connected, or nothing in flight: nothing to wait for
        self.poke.notify()

    async def run(self) -> None:
        backoff = Backoff(self._config.backoff_initial_s, self._config.backoff_max_s, rng=self._rng)
        try:
            while not self._stop.is_set():
                self.status.phase = DeviceLinkPhase.CONNECTING
                self.status.next_attempt_at = None
                error: BaseException | None = None
                try:
                    with trio.CancelScope() as self._session_scope:
                        await self._session(backoff)
                except* EXPECTED as group:
                    error = _first_leaf(group)
                finally:
                    self._session_scope = None
                if self.window.state is not ChannelState.DISCONNECTED:
                    self.window.connection_lost(self._clock())
                was_up = self.status.connected_since is not None
                self.status.connected_since = None
                if error is not None:
                    self._failed(error)
                if was_up and not self._stop.is_set():  # the box stopping says so itself ("closing")
                    self._note("device.link_down",
                               reason=self.status.last_error if error is not None else "closed by the box")
                await self._flush(force=True)
                if self._stop.is_set():
                    break
                delay = backoff.next_delay()
                self.status.phase = DeviceLinkPhase.BACKING_OFF
                self.status.next_attempt_at = self._clock() + delay
                await self._wait(delay)
        finally:
            self.status.phase = DeviceLinkPhase.STOPPED
            self.status.next_attempt_at = None

    # --- one connection --------------------------------------------------------------

    async def _session(self, backoff: Backoff) -> None:
        t, cfg = self.target, self._config
        with trio.fail_after(cfg.connect_timeout_s):
            stream = _Cork(await self._open_stream(t.address, t.port))
        try:
            async with trio.open_nursery() as nursery:
                ws: WebSocketConnection | None = None
                with trio.move_on_after(cfg.connect_timeout_s):
                    # The shim and a generic stream stand in for trio's own types.
                    ws = await wrap_client_stream(_ContainedNursery(nursery), stream,  # type: ignore[arg-type]
                                                  _endpoint(t.address, t.port), "/",
                                                  subprotocols=[SUBPROTOCOL], message_queue_size=cfg.window,
                                                  max_message_size=MAX_DEVICE_MESSAGE_BYTES)
                if ws is None:
                    raise LinkStalled(f"the TCP connection opened but no WebSocket answer came within "
                                      f"{cfg.connect_timeout_s:g} s")
                if ws.subprotocol != SUBPROTOCOL:
                    raise ChannelProtocolError(f"the device did not accept the subprotocol {SUBPROTOCOL} "
                                               f"(it answered {ws.subprotocol or 'none'})")
                hello: Hello | None = None
                with trio.move_on_after(cfg.hello_timeout_s):
                    hello = await self._hello(ws)
                if hello is None:
                    raise LinkStalled(f"no hello within {cfg.hello_timeout_s:g} s of connecting")
                now = self._clock()
                self.window.connection_made(now)
                self.window.receive(hello, now)
                self.status.phase = DeviceLinkPhase.CONNECTED
                self.status.connected_since = now
                self.status.firmware = hello.firmware
                self._note("device.link_up", firmware=hello.firmware)
                async with trio.open_nursery() as tasks:
                    tasks.start_soon(self._reader, ws, backoff)
                    tasks.start_soon(self._pinger, ws, backoff)
                    await self._writer(ws, stream)
                    tasks.cancel_scope.cancel()
                # Drained: every send finished and nothing is in flight, so a polite close is safe.
                with trio.move_on_after(_POLITE_CLOSE_S, shield=True):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
        finally:
            with trio.move_on_after(_STREAM_CLOSE_S, shield=True):
                await stream.aclose()

    async def _hello(self, ws: WebSocketConnection) -> Hello:
        """The device's hello and, for a device with a key, both proofs of it."""
        t = self.target
        hello = parse_device_message(await ws.get_message())
        if not isinstance(hello, Hello):
            raise ChannelProtocolError("the device's first message must be its hello")
        if hello.device_id != t.id:
            raise ChannelProtocolError(f"the device at this address says it is {hello.device_id!r}, not {t.id!r}")
        if t.key is None:
            return hello
        if hello.nonce is None:
            raise HelloRefused("the device sent no nonce in its hello: it did not take part in the key proof")
        device_nonce, box_nonce = bytes.fromhex(hello.nonce), secrets.token_bytes(idp.NONCE_BYTES)
        await ws.send_message(encode_box_auth(box_nonce.hex(), idp.box_proof(t.key, t.id, device_nonce, box_nonce)))
        try:
            answer = parse_device_message(await ws.get_message())
        except ConnectionClosed:
            raise HelloRefused("the device closed the connection instead of proving the key") from None
        expected = idp.device_proof(t.key, t.id, device_nonce, box_nonce)
        try:
            idp.check_proof(expected, answer.proof if isinstance(answer, Auth) else None, "the device")
        except idp.HelloFailed as exc:
            raise HelloRefused(str(exc)) from None
        return hello

    async def _writer(self, ws: WebSocketConnection, stream: _Cork) -> None:
        self._writing = True
        try:
            await self._write(ws, stream)
        finally:
            self._writing = False

    async def _write(self, ws: WebSocketConnection, stream: _Cork) -> None:
        window, seen = self.window, self.poke.version
        while True:
            window.handle_timer(self._clock())
            if self._wants_load():
                await self._load()
            command = window.next_transmit(self._clock())  # the time now, after the load
            if command is not None:
                stream.cork()  # every command the window lets go now, in one write
                while command is not None:
                    await ws.send_message(encode_command(command))
                    command = window.next_transmit(self._clock())
                await stream.uncork()
                await self._flush(force=False)
                continue
            # A record waits while commands are in flight (at most _RECORD_HOLD_S): a command's
            # sent and acked records ~1 ms apart then share one commit of the recorder.
            held = window.oldest_unrecorded_at
            await self._flush(force=window.idle or self._stop.is_set()
                              or (held is not None and self._clock() >= held + _RECORD_HOLD_S))
            if self._stop.is_set() and window.idle:
                return
            timer = window.get_timer()
            held = window.oldest_unrecorded_at
            if held is not None:
                timer = held + _RECORD_HOLD_S if timer is None else min(timer, held + _RECORD_HOLD_S)
            with trio.move_on_at(self._trio_time(timer)):
                seen = await self.poke.wait(seen)

    async def _reader(self, ws: WebSocketConnection, backoff: Backoff) -> None:
        window = self.window
        while True:
            message = parse_device_message(await ws.get_message())
            now = self._clock()
            acked = window.stats.acked
            window.receive(message, now)
            if window.take_ticket_request():
                self._ask_ticket(self.target.id)
            if window.stats.acked > acked:
                self.status.last_ack_at = now
                self._proved(backoff)
            self.poke.notify()

    async def _pinger(self, ws: WebSocketConnection, backoff: Backoff) -> None:
        cfg = self._config
        while True:
            await trio.sleep(cfg.ping_interval_s)
            with trio.move_on_after(cfg.ping_timeout_s) as scope:
                await ws.ping()
            if scope.cancelled_caught:
                raise LinkStalled(f"no answer to a WebSocket ping within {cfg.ping_timeout_s:g} s")
            if self.window.state is ChannelState.OPEN:
                self._proved(backoff)

    # --- helpers ---------------------------------------------------------------------

    def _wants_load(self) -> bool:
        if self._stop.is_set() or self.window.room() < min(self._load_at_room, self.window.capacity):
            return False
        return self.known_seq is None or self.known_seq > self._cursor

    async def _load(self) -> None:
        window = self.window
        # At most a window's worth of rows by the outbox's index: read in trio's thread
        # (Database.read_small); a hop to a worker thread and back was a good part of a lone
        # command's way from its commit to the device under load (scripts/bench dispatch).
        self._loading = True  # take() leaves what comes meanwhile to the next read
        try:
            commands, cursor = await self._db.read_small(partial(load_unsettled, device_id=self.target.id,
                                                                 after_seq=self._cursor, limit=window.room()))
        finally:
            self._loading = False
        window.offer(c for c in commands if c.seq > window.last_seq)
        self._cursor = cursor
        if self.known_seq is None or cursor > self.known_seq:
            self.known_seq = cursor

    async def _flush(self, *, force: bool) -> None:
        """Hand the window's records to the recorder (a batch at a time; bounded channel)."""
        window = self.window
        self.status.in_flight, self.status.held = window.in_flight, window.pending
        if not force and window.unrecorded < _RECORD_BATCH and not self._notes:
            return
        records: list[Record | LinkNote] = list(window.take_records())
        notes, self._notes = self._notes, []
        if not records and not notes:
            return
        device = self.target.id
        for record in records:
            if isinstance(record, Sent):
                self.status.sent += 1
                self._metrics.inc("device_commands_sent", device=device)
            elif isinstance(record, Acked):
                self.status.acked += 1
                self._metrics.inc("device_commands_acked", device=device)
            elif isinstance(record, Dead):
                self.status.dead += 1
                self._metrics.inc("device_commands_dead", device=device)
        await self._records.send([*records, *notes])

    async def _wait(self, delay: float) -> None:
        """Back off for ``delay`` seconds, still expiring held commands; a stop ends it."""
        deadline = trio.current_time() + delay
        seen = self.poke.version
        while not self._stop.is_set() and trio.current_time() < deadline:
            timer = self.window.get_timer()
            with trio.move_on_at(min(deadline, self._trio_time(timer))):
                seen = await self.poke.wait(seen)
            self.window.handle_timer(self._clock())
            await self._flush(force=True)

    def _trio_time(self, at: float | None) -> float:
        """A deadline on the link's clock as a deadline on trio's clock."""
        if at is None:
            return math.inf
        return trio.current_time() + max(0.0, at - self._clock())

    def _note(self, type: str, **data: str) -> None:
        t = self.target
        self._notes.append(LinkNote(type=type, device_id=t.id, at=self._clock(),
                                    data={"device_id": t.id, "address": t.address, **data}))

    def _proved(self, backoff: Backoff) -> None:
        backoff.reset()
        self.status.failures = 0

    def _failed(self, error: BaseException) -> None:
        message, fix = describe_failure(error, self.target.address, self.target.port, self._config.connect_timeout_s)
        self.status.failures += 1
        self.status.last_error, self.status.last_fix = message, fix
        self.status.last_error_at = self._clock()
        self._metrics.inc("device_link_failures", device=self.target.id)
