"""The store API listener's HTTP/1.1 connections, served on h11 by one task each.

hypercorn serves every other listener. For the store API's small JSON answers its
per-request machinery was most of the box's work (docs/store-api.md, "Speed"): a task and a
memory channel per request, the request and response each passed through three layers of
event objects, three writes each through a lock and a shielded scope, an idle timer
rearmed per request. Here one task per connection does it all in turn: wait for a request
head (read by :func:`~appliance.protocol.http_head.plain_head` when it is plain and whole
in the bytes at hand, as nearly every client's is: a tenth of h11's cost, and the same
result, which a differential test checks; else by h11, a fresh parser per request given the
bytes read past the last, which reads on as it needs and answers errors), call the ASGI app
in the same task, whose ``receive`` reads the body from the socket as the app asks for it
(a plain head's Content-Length body here, exactly as h11's reader would: the bytes as they
come, none past its end, a client's end before it answered 400; any other body h11's), and
send the answer's head and body in one write, framed and checked by
:class:`~appliance.protocol.http_answer.Answer` (h11's send side cost more than the rest).
There is no pipelining to serve concurrently (HTTP/1.1 answers in order anyway).

The bounds are hypercorn's, from the same Config (docs/hardening.md):

- the request head must be complete within ``keep_alive_timeout`` from accept and from the
  end of the previous answer; at most ``h11_max_incomplete_size`` bytes of it (431);
- no byte from the client for ``read_timeout`` while one is awaited closes the connection;
- a malformed request gets h11's status (400...) with ``Connection: close``, then the close;
- after ``keep_alive_max_requests`` answers the connection closes (``Connection: close``);
- once the server stops, an idle connection is closed at once, and a request in progress is
  answered and its connection then closed (the listener's nursery bounds how long).

The listener's own bounds stay where they were: connection caps, HTTP/2 refused and the
place given back on a client's leaving (``_CappedListener`` and ``_Connection`` in
``services/http.py``); Host, bodies, requests in progress, security headers and the early
answer's ``Connection: close`` (the guard, ``services/guard.py``).

Differences from hypercorn a client can see: head and body leave in one segment; an
answer given whole without a Content-Length gets one (hypercorn chunked it); the answer
to the last request a connection will carry says ``Connection: close`` whatever the reason
(HTTP/1.0, the client's own ``Connection: close``, a stop). Reading stops while the app
works (a client that leaves during a request is seen at the answer's write, not before,
and a slow answer is not cut by the read timeout, which hypercorn's reading during the app
did), and ``receive()`` after the whole body reads on for the client's leaving, as
hypercorn's does.

Errors: a peer's doing (bad bytes, a timeout, a reset) ends its connection only; an
exception from the app is logged as hypercorn logs it ("Error in ASGI Framework") and
answered 500 if no answer had started (else the connection is closed), and never ends the
listener.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from math import inf
from typing import Any, Final
from urllib.parse import unquote
from wsgiref.handlers import format_date_time

import h11
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.typing import LifespanState
from hypercorn.utils import parse_socket_addr

from appliance.protocol.http_answer import Answer, AnswerError, bare_answer
from appliance.protocol.http_head import PlainHead, plain_head

__all__ = ["BODY_AT_HAND", "IdleConnections", "serve_h11"]

log = logging.getLogger(__name__)

Message = dict[str, Any]
App = Callable[[dict[str, Any], Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
               Awaitable[None]]

# One receive: as hypercorn's (MAX_RECV).
_RECEIVE_BYTES: Final = 65536
# A pipelined client's bytes read ahead (while an app waits on receive() after the body) are
# kept up to this; beyond it reading waits for the answer.
_READ_AHEAD_BYTES: Final = 65536
_ASGI: Final = {"spec_version": "2.1", "version": "3.0"}
_DISCONNECT: Final = {"type": "http.disconnect"}
_LAST_CHUNK: Final = {"type": "http.request", "body": b"", "more_body": False}
# The ASGI scope's extension by which an app learns that the request's whole body is
# already read (``scope["extensions"][BODY_AT_HAND]()`` is True): its receive() calls will
# not wait, so the app needs no deadline around them (a cancel scope with a deadline costs
# a one-command POST some 6 us). Given for a plain head's request only.
BODY_AT_HAND: Final = "appliance.body_at_hand"


class IdleConnections:
    """A listener's connections waiting for a request head: closed at once when the server
    stops (:meth:`close_all`); a connection that goes idle after that closes by itself."""

    def __init__(self) -> None:
        self.stopping = False
        self._waiting: set[trio.CancelScope] = set()

    def close_all(self) -> None:
        self.stopping = True
        for scope in self._waiting:
            scope.cancel()

    def enter(self, scope: trio.CancelScope) -> None:
        self._waiting.add(scope)

    def leave(self, scope: trio.CancelScope) -> None:
        self._waiting.discard(scope)


class _Gone(Exception):
    """The client left, reset, sent nothing for the read timeout, or broke the protocol
    (its error answer, if one was due, already sent): the connection ends."""


class _Date:
    """The Date header's value, made once a second rather than per answer."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._second, self._value = second, format_date_time(second).encode("ascii")
        return self._value


_DATE: Final = _Date()


async def serve_h11(app: App, config: HypercornConfig, idle: IdleConnections, state: LifespanState,
                    stream: trio.abc.HalfCloseableStream) -> None:
    """Serve one accepted connection until it ends; closes ``stream``. Never raises for
    what the peer or the app did (Cancelled passes)."""
    try:
        # A peer that reset before its connection was served has no address left to read
        # (ENOTCONN): its connection ends here, as hypercorn's does, and nothing else.
        with contextlib.suppress(OSError):
            connection = _H11Connection(app, config, idle, state, stream)
            await connection.run()
    finally:
        with trio.CancelScope(shield=True):  # both are immediate on a socket
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                await stream.send_eof()
            await stream.aclose()


class _H11Connection:
    def __init__(self, app: App, config: HypercornConfig, idle: IdleConnections, state: LifespanState,
                 stream: trio.abc.HalfCloseableStream) -> None:
        self.app, self.config, self.idle, self.state, self.stream = app, config, idle, state, stream
        sock = stream.socket  # type: ignore[attr-defined]  # the listener's streams carry their socket
        self.client = parse_socket_addr(sock.family, sock.getpeername())
        self.server = parse_socket_addr(sock.family, sock.getsockname())
        self.read_s = config.read_timeout or inf
        self.extra_headers: list[tuple[bytes, bytes]] = []
        if config.include_server_header:
            self.extra_headers.append((b"server", b"hypercorn-h11"))
        # The request's h11 parser, or None while a plain head read by plain_head() is served;
        # ``pending`` then holds the bytes read past its head, of which the first
        # ``body_left`` are its body's still to give the app.
        self.h11: h11.Connection | None = None
        self.pending = b""
        self.body_left = 0
        self.answers = 0
        self.broken = False  # the stream cannot carry more (a failed or cut write, the peer gone)
        # The request being answered:
        self.method = ""
        self.http10 = False
        self.keep_alive = True  # the request lets the connection carry another after it
        self.continued = False  # a "100 Continue" was sent for it
        self.body_done = False  # its body has all been read
        self.answer: Answer | None = None  # from its http.response.start on

    def _parser(self, data: bytes, *, closed: bool) -> h11.Connection:
        """A new h11 parser for the next request, given the bytes already read past the last.
        h11 parses requests only: answers are written by :class:`Answer`, so a request's
        parser is not reused (its side of the exchange never reaches DONE)."""
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=self.config.h11_max_incomplete_size)
        if data:
            parser.receive_data(data)
        if closed:
            parser.receive_data(b"")
        return parser

    async def run(self) -> None:
        # The request heads' wait: one cancel scope for the connection's life, armed only while
        # a head is awaited (see _next_request); one per request cost each some 4.5 us.
        with trio.CancelScope() as waiting:
            await self._serve(waiting)

    async def _serve(self, waiting: trio.CancelScope) -> None:
        try:
            while True:
                request = await self._next_request(waiting)
                if request is None:
                    return
                await self._answer(request)
                self._end_of_request()
                if self.broken or not self.keep_alive or self.answer is None or not self.answer.done \
                        or self.answer.close or self.idle.stopping:
                    return
                if self.h11 is not None:
                    if self.h11.their_state is not h11.DONE:
                        return
                    data, closed = self.h11.trailing_data
                    if closed:  # the client closed its side: h11 reads what it left (a request, or the end)
                        self.h11 = self._parser(data, closed=True)
                    else:
                        self.pending, self.h11 = data, None
        except _Gone:
            return

    async def _receive_some(self) -> bytes:
        """Bytes from the client, within the read timeout; _Gone if none come."""
        with trio.CancelScope(deadline=trio.current_time() + self.read_s) as reading:
            try:
                data = await self.stream.receive_some(_RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.broken = True
                raise _Gone from exc
        if reading.cancelled_caught:
            self.broken = True
            raise _Gone
        return bytes(data)

    async def _next_event(self, waiting: trio.CancelScope | None = None, idle_until: float = inf) -> Any:
        """h11's next event, reading as needed; a malformed request is answered and _Gone.
        ``waiting``: a scope the caller is in, whose deadline each read sets to the sooner of
        ``idle_until`` and the read timeout (one scope for the head's wait, not two)."""
        assert self.h11 is not None
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                if self.answer is None or not self.answer.started:
                    await self._write(bare_answer(exc.error_status_hint, self._extra_headers()))
                self.broken = True
                raise _Gone from exc
            if event is not h11.NEED_DATA:
                return event
            data = await self._receive_some() if waiting is None else await self._receive_waiting(waiting, idle_until)
            self.h11.receive_data(data)  # b"": the client has closed its side; h11 says what follows

    async def _receive_waiting(self, waiting: trio.CancelScope, idle_until: float) -> bytes:
        """Bytes from the client (b"": it closed its side) in ``waiting``, whose deadline is
        set to the sooner of ``idle_until`` and the read timeout; _Gone if it broke."""
        waiting.deadline = min(idle_until, trio.current_time() + self.read_s)
        try:
            return bytes(await self.stream.receive_some(_RECEIVE_BYTES))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.broken = True
            raise _Gone from exc

    async def _next_request(self, waiting: trio.CancelScope) -> h11.Request | PlainHead | None:
        """The next request's head, within the keep-alive timeout; None when the connection
        should end (the client left, the server stops, the head did not come in time).

        ``waiting`` is the connection's scope around every request (:meth:`run`): armed here
        only, while the head is awaited (its deadline set before each read, the server's stop
        cancelling it), and disarmed before the request is served. A head that did not come in
        time, or the stop, cancels the wait, which ends the connection at that scope. A
        deadline or a stop in the very turn the head came ends it too: the request is not
        served, as the scope, already cancelled, would cancel it."""
        if self.idle.stopping:
            return None
        self.answer = None
        # The head within keep_alive_timeout (from accept, or from the last answer), and no
        # silence longer than the read timeout meanwhile: either ends the connection.
        self.idle.enter(waiting)
        try:
            event = await self._next_head(waiting, trio.current_time() + self.config.keep_alive_timeout)
        finally:
            self.idle.leave(waiting)
            waiting.deadline = inf
        if waiting.cancel_called:
            self.broken = True
            return None
        return event if isinstance(event, (h11.Request, PlainHead)) else None  # ConnectionClosed, PAUSED: the end

    async def _next_head(self, waiting: trio.CancelScope, idle_until: float) -> Any:
        """A plain head (:func:`plain_head`) if the bytes already read, or else the first read,
        hold one whole; else h11's next event on those bytes, reading on as h11 needs (a head
        sent in pieces, a body, anything malformed: all h11's, as before)."""
        if self.h11 is not None:  # the bytes left after the client's end: h11's
            return await self._next_event(waiting, idle_until)
        data, self.pending = self.pending, b""
        if not data:
            data = await self._receive_waiting(waiting, idle_until)
            if not data:
                self.h11 = self._parser(b"", closed=True)
                return await self._next_event(waiting, idle_until)
        head = plain_head(data, self.config.h11_max_incomplete_size)
        if head is not None:
            self.pending = data[head.end:]
            return head
        self.h11 = self._parser(data, closed=False)
        return await self._next_event(waiting, idle_until)

    async def _answer(self, request: h11.Request | PlainHead) -> None:
        self.method = request.method.decode("ascii").upper()
        if isinstance(request, PlainHead):
            self.http10, version = False, "1.1"
            headers = request.headers
            self.body_left = request.length
            self.body_done = False  # (no body: the app's first receive() gets its empty end)
        else:
            self.http10, version = request.http_version < b"1.1", request.http_version.decode()
            # The (name, value) pairs, names lower-cased by h11, taken from its list in one go:
            # through its Sequence interface each pair costs a Python call (a signed request has six).
            full = getattr(request.headers, "_full_items", None)
            headers = [(name, value) for _, name, value in full] if full is not None else list(request.headers)
            assert self.h11 is not None
            self.body_done = self.h11.their_state is not h11.SEND_BODY
        # As h11 keeps a connection (RFC 9112 §9.3): not after HTTP/1.0, nor Connection: close.
        self.keep_alive = not self.http10
        for name, value in headers:
            if name == b"connection" and b"close" in value.lower():
                self.keep_alive = False
        self.continued = False
        path, _, query = request.target.partition(b"?")
        scope = {
            "type": "http", "http_version": version, "asgi": _ASGI,
            "method": self.method, "scheme": "http", "path": unquote(path.decode("ascii")), "raw_path": path,
            "query_string": query, "root_path": self.config.root_path, "headers": headers,
            "client": self.client, "server": self.server, "state": self.state.copy(),
            "extensions": {BODY_AT_HAND: self._body_at_hand} if isinstance(request, PlainHead) else {},
        }
        self.answers += 1
        try:
            await self.app(scope, self._receive, self._send)
        except Exception:  # noqa: BLE001  (the app's bug: logged, this request answered 500, the listener goes on)
            await self.config.log.exception("Error in ASGI Framework")
        if self.broken or (self.answer is not None and self.answer.done):
            return
        if self.answer is not None and self.answer.started:
            self.broken = True  # an answer cut short: the client must see the connection end
        else:
            self.keep_alive = False
            await self._write(bare_answer(500, self._extra_headers()))

    def _end_of_request(self) -> None:
        """Take the rest of the request from what was read (a GET's end, a body the app did
        not ask for), never reading more: whatever is missing, the connection then ends."""
        if self.h11 is None:  # a plain head's request: its body's rest must be here already
            if self.body_left:
                if len(self.pending) < self.body_left:
                    self.broken = True  # the connection ends (as h11's request not DONE)
                    return
                self.pending = self.pending[self.body_left:]
                self.body_left = 0
            return
        try:
            while self.h11.their_state is h11.SEND_BODY:
                if self.h11.next_event() in (h11.NEED_DATA, h11.PAUSED):
                    return
        except h11.RemoteProtocolError:
            self.broken = True

    async def _receive(self) -> Message:
        if self.body_done:
            return await self._wait_for_leaving()
        if self.h11 is None:  # a plain head's request
            return await self._plain_body()
        if self.h11.they_are_waiting_for_100_continue and not self.continued and self.answer is None:
            self.continued = True
            await self._write(b"HTTP/1.1 100 \r\n\r\n")
        try:
            event = await self._next_event()
        except _Gone:
            self.body_done = True
            return _DISCONNECT
        if isinstance(event, h11.Data):
            return {"type": "http.request", "body": bytes(event.data), "more_body": True}
        self.body_done = True
        if isinstance(event, h11.EndOfMessage):
            return _LAST_CHUNK
        self.broken = True  # ConnectionClosed mid-body
        return _DISCONNECT

    def _body_at_hand(self) -> bool:
        """Whether a plain head's body, all that is left of it, is read already."""
        return self.h11 is None and len(self.pending) >= self.body_left

    async def _plain_body(self) -> Message:
        """The next piece of a plain head's body (its Content-Length's worth, none past it):
        what was read past the head, else one read (within the read timeout); as h11 gives
        it, except that the last piece says it is the last (h11 gives an empty end after it).
        The client's end before the whole body: answered 400 (as h11 answers it) and ended."""
        left = self.body_left
        if not left:
            self.body_done = True
            return _LAST_CHUNK
        if not self.pending:
            try:
                data = await self._receive_some()
            except _Gone:
                self.body_done = True
                return _DISCONNECT
            if not data:
                if self.answer is None or not self.answer.started:
                    await self._write(bare_answer(400, self._extra_headers()))
                self.broken = self.body_done = True
                return _DISCONNECT
            self.pending = data
        if len(self.pending) <= left:
            chunk, self.pending = self.pending, b""
        else:
            chunk, self.pending = self.pending[:left], self.pending[left:]
        self.body_left = left = left - len(chunk)
        self.body_done = not left
        return {"type": "http.request", "body": chunk, "more_body": bool(left)}

    async def _wait_for_leaving(self) -> Message:
        """``receive()`` after the body: an ASGI app awaits it for the client's leaving."""
        if self.broken or (self.answer is not None and self.answer.done):
            return _DISCONNECT
        while len(self.pending if self.h11 is None else self.h11.trailing_data[0]) < _READ_AHEAD_BYTES:
            try:
                data = await self._receive_some()
            except _Gone:
                return _DISCONNECT
            if not data:
                self.broken = True
                return _DISCONNECT
            # A pipelined request's bytes: kept for its turn.
            if self.h11 is None:
                self.pending += data
            else:
                self.h11.receive_data(data)
        await trio.sleep_forever()  # the client sends on without reading: wait for the answer's end
        raise AssertionError("unreachable")

    async def _send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start" and self.answer is None:
            close = not self.keep_alive or self.answers >= self.config.keep_alive_max_requests or self.idle.stopping
            self.answer = Answer(int(message["status"]), message.get("headers", ()), method=self.method,
                                 http10=self.http10, close=close, extra=self._extra_headers())
        elif kind == "http.response.body" and self.answer is not None:
            if self.broken or self.answer.done:
                return
            try:
                out = self.answer.write(bytes(message.get("body", b"")), bool(message.get("more_body", False)))
            except AnswerError:
                self.broken = True  # what was written of it cannot be finished
                raise
            if out:
                await self._write(out)
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} (answer started: {self.answer is not None})")

    def _extra_headers(self) -> list[tuple[bytes, bytes]]:
        if self.config.include_date_header:
            return [(b"date", _DATE.now()), *self.extra_headers]
        return self.extra_headers

    async def _write(self, data: bytes) -> None:
        if self.broken:
            return
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.broken = True
        except BaseException:
            self.broken = True  # cut mid-write (cancelled): what the client got is not a whole answer
            raise
