"""The store API's own HTTP/1.1 loop (appliance/services/h11_serving.py) on loopback, as
hypercorn serves: requests in order on one connection, a malformed or oversized head
answered and closed, an app's failure answered 500 (or its connection cut) without ending
the listener, streamed and HEAD answers, ``Expect: 100-continue``, the last request a
connection may carry, a body the app did not read, and the store API itself over
keep-alive. Its timeouts and stop are in tests/test_listener_idle.py (run against both
servers)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any
from unittest.mock import patch

import h11
import httpx
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from appliance.services.http import ConnectionCaps, _CappedListener, _serve, bind_tcp
from appliance.services.runtime import Runtime
from benchmarks._scripted import ScriptedConnection
from tests.sync_helpers import StartBox, api_client
from tests.test_listener_idle import app as lifespan_of_the_idle_tests

pytest_plugins = ["tests.sync_fixtures"]

MAX_REQUESTS = 5


class AppFailed(Exception):
    pass


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await lifespan_of_the_idle_tests(scope, receive, send)
        return
    path = scope["path"]
    if path == "/boom":
        raise AppFailed("before the answer")
    if path == "/none":
        return
    start = {"type": "http.response.start", "status": 200, "headers": [(b"x-path", path.encode())]}
    if path == "/echo":
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({**start, "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        return
    if path in ("/stream", "/cut"):
        await send(start)
        await send({"type": "http.response.body", "body": b"one,", "more_body": True})
        if path == "/cut":
            raise AppFailed("in the middle of the answer")
        await send({"type": "http.response.body", "body": b"two", "more_body": False})
        return
    if path == "/inject":  # a header value that would start another header
        await send({**start, "headers": [(b"location", b"/x\r\nset-cookie: a=1")]})
        await send({"type": "http.response.body", "body": b"never"})
        return
    if path == "/boom-late":
        await send(start)
        raise AppFailed("after the answer's start")
    await send({**start, "headers": [*start["headers"], (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@asynccontextmanager
async def served() -> AsyncIterator[int]:
    sock = bind_tcp("127.0.0.1", 0, role="api")
    port = sock.getsockname()[1]
    capped = _CappedListener(trio.SocketListener(trio.socket.from_stdlib_socket(sock)),
                             ConnectionCaps(total=100, per_source=100), role="api")
    cfg = HypercornConfig()
    cfg.keep_alive_timeout = 5
    cfg.keep_alive_max_requests = MAX_REQUESTS
    cfg.h11_max_incomplete_size = 4096
    cfg.graceful_timeout = 5
    cfg.accesslog = None
    stopping = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(_serve, app, cfg, capped, stopping, own_h11=True))
        yield port
        stopping.set()


class Client:
    """One connection, its requests and answers through h11's client side."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    def request(self, method: str, path: str, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()) -> bytes:
        head = [("host", "127.0.0.1"), *headers]
        if body or method == "POST":
            head.append(("content-length", str(len(body))))
        out = self.h11.send(h11.Request(method=method, target=path, headers=head)) or b""
        if body:
            out += self.h11.send(h11.Data(data=body)) or b""
        return out + (self.h11.send(h11.EndOfMessage()) or b"")

    async def answer(self) -> tuple[h11.Response, bytes]:
        """The next answer whole: its head and body."""
        response: h11.Response | None = None
        body = b""
        with trio.fail_after(5):
            while True:
                event = self.h11.next_event()
                if event is h11.NEED_DATA:
                    self.h11.receive_data(await self.stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert response is not None
                    if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                        self.h11.start_next_cycle()
                    return response, body
                else:
                    raise AssertionError(f"unexpected {event!r}")


async def closed(stream: trio.SocketStream) -> bytes:
    """What the server sends until it closes the connection (fails if it does not, in 5 s)."""
    got = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(65536):
            got += chunk
    return got


def header(response: h11.Response, name: bytes) -> bytes | None:
    return next((v for k, v in response.headers if k == name), None)


async def test_requests_sent_together_are_answered_in_order_on_one_connection() -> None:
    async with served() as port, await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"GET /first HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                              b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 8\r\n\r\nthe body"
                              b"GET /third HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        client = Client(stream)  # its h11 is told of each request (already sent) to read its answer
        client.request("GET", "/first")
        first, body = await client.answer()
        assert (first.status_code, header(first, b"x-path"), body) == (200, b"/first", b"ok")
        client.request("POST", "/echo", b"the body")
        second, body = await client.answer()
        assert (second.status_code, body) == (200, b"the body")
        client.request("GET", "/third")
        third, body = await client.answer()
        assert (third.status_code, header(third, b"x-path")) == (200, b"/third")


@pytest.mark.parametrize(("wire", "status"), [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 5000, 431),  # and still no end to it
    # Nearly plain (appliance/protocol/http_head.py leaves them to h11):
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: 127.0.0.2\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: \x00\r\n\r\n", 400),
    (b"GET /a b HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    (b" GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
])
async def test_a_malformed_or_oversized_head_is_answered_and_its_connection_closed(wire: bytes, status: int) -> None:
    async with served() as port, await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(wire)
        got = await closed(stream)
        assert got.startswith(f"HTTP/1.1 {status} ".encode()), got
        assert b"\r\nconnection: close\r\n" in got.lower(), got


async def test_an_app_s_failure_is_answered_500_and_the_listener_serves_on(caplog: pytest.LogCaptureFixture) -> None:
    async with served() as port:
        for path in ("/boom", "/none", "/boom-late", "/inject"):
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                client = Client(stream)
                await stream.send_all(client.request("GET", path))
                response, _ = await client.answer()
                assert response.status_code == 500, path
                assert header(response, b"connection") == b"close"
                assert header(response, b"set-cookie") is None
                assert await closed(stream) == b""
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            client = Client(stream)
            await stream.send_all(client.request("GET", "/"))
            assert (await client.answer())[1] == b"ok"
    assert [r.getMessage() for r in caplog.records].count("Error in ASGI Framework") == 3  # /boom, /boom-late, /inject


async def test_an_answer_cut_short_ends_its_connection() -> None:
    async with served() as port, await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"GET /cut HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        got = await closed(stream)
        assert got.startswith(b"HTTP/1.1 200 ") and b"\r\ntransfer-encoding: chunked\r\n" in got.lower(), got
        assert b"one," in got and not got.endswith(b"0\r\n\r\n"), got  # no last chunk: the client sees it cut


async def test_a_streamed_answer_is_chunked_and_a_head_request_gets_no_body() -> None:
    async with served() as port, await trio.open_tcp_stream("127.0.0.1", port) as stream:
        client = Client(stream)
        await stream.send_all(client.request("GET", "/stream"))
        response, body = await client.answer()
        assert header(response, b"transfer-encoding") == b"chunked" and body == b"one,two"
        await stream.send_all(client.request("HEAD", "/"))
        response, body = await client.answer()
        assert (response.status_code, header(response, b"content-length"), body) == (200, b"2", b"")
        await stream.send_all(client.request("GET", "/"))  # and the connection goes on
        assert (await client.answer())[1] == b"ok"


async def test_a_client_expecting_100_continue_gets_it_when_the_app_reads_the_body() -> None:
    async with served() as port, await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
                              b"Expect: 100-continue\r\n\r\n")
        got = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in got:
                got += await stream.receive_some(65536)
        assert got.startswith(b"HTTP/1.1 100 "), got
        await stream.send_all(b"hello")
        with trio.fail_after(5):
            while not got.endswith(b"hello"):
                got += await stream.receive_some(65536)
        assert b"HTTP/1.1 200 " in got


async def test_the_last_request_a_connection_may_carry_is_answered_with_its_close() -> None:
    async with served() as port, await trio.open_tcp_stream("127.0.0.1", port) as stream:
        client = Client(stream)
        for n in range(1, MAX_REQUESTS + 1):
            await stream.send_all(client.request("GET", "/"))
            response, _ = await client.answer()
            assert header(response, b"connection") == (b"close" if n == MAX_REQUESTS else None), n
        assert await closed(stream) == b""


async def test_a_body_the_app_did_not_read_keeps_the_connection_only_if_it_had_all_arrived() -> None:
    async with served() as port:
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            client = Client(stream)
            await stream.send_all(client.request("POST", "/", b"unread"))
            assert (await client.answer())[1] == b"ok"
            await stream.send_all(client.request("GET", "/"))
            assert (await client.answer())[1] == b"ok"
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\nonly some")
            got = await closed(stream)
            assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"ok"), got


async def test_the_store_api_answers_whole_over_keep_alive(start_box: StartBox) -> None:
    box: Runtime = await start_box()
    async with api_client(box) as api:
        for _ in range(3):  # one connection, answers of every kind in turn
            assert (await api.get("/v1/products/none")).status_code == 503
            assert (await api.head("/v1/openapi.json")).status_code == 200
            answer = await api.get("/v1/openapi.json")
            assert answer.status_code == 200 and answer.json()["openapi"] == "3.1.0"
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{box.ports['api']}", http2=False) as raw:
        assert (await raw.get("/healthz")).json()["status"] == "ok"


@pytest.mark.parametrize("wire", [
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
])
async def test_a_client_that_will_not_keep_the_connection_gets_its_answer_and_the_close(wire: bytes) -> None:
    async with served() as port, await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(wire)
        got = await closed(stream)
        assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"\r\n\r\nok"), got
        assert b"\r\nconnection: close\r\n" in got, got


async def read_answers(stream: trio.SocketStream, count: int) -> list[bytes]:
    """``count`` whole answers (each with a Content-Length) from ``stream``, as bytes."""
    got, answers = b"", []
    with trio.fail_after(5):
        while len(answers) < count:
            head, sep, rest = got.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), None)
            if sep and length is not None and len(rest) >= length:
                answers.append(head + sep + rest[:length])
                got = rest[length:]
                continue
            got += await stream.receive_some(65536)
    return answers


async def test_plain_heads_and_h11_s_heads_take_turns_on_one_connection() -> None:
    """A head read whole by the plain reader (appliance/protocol/http_head.py) or by h11 (sent
    in pieces, with a body, with bare LFs or a folded line): the same answers, in order, on
    one connection; a bodiless GET's app reading its body gets an empty one."""
    plain = b"GET /first HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    async with served() as port, await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(plain + b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /sec")  # and half the next
        first, echo = await read_answers(stream, 2)
        assert first.startswith(b"HTTP/1.1 200 ") and b"x-path: /first" in first and first.endswith(b"ok")
        assert echo.startswith(b"HTTP/1.1 200 ") and b"content-length: 0" in echo
        for piece in (b"ond HTTP/1.1\r\nHo", b"st: 127.0.0.1\r", b"\n\r\n"):  # the rest, in pieces: h11's
            await stream.send_all(piece)
            await trio.sleep(0.01)
        assert b"x-path: /second" in (await read_answers(stream, 1))[0]
    async with served() as port, await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"GET /lf HTTP/1.1\nHost: 127.0.0.1\n\n"
                              b"GET /fold HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: b\r\n c\r\n\r\n"
                              b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\n\r\nbody" + plain)
        lf, fold, posted, last = await read_answers(stream, 4)
        assert b"x-path: /lf" in lf and b"x-path: /fold" in fold and posted.endswith(b"\r\n\r\nbody")
        assert b"x-path: /first" in last and b"connection" not in last
        await stream.send_all(plain)  # the 5th (MAX_REQUESTS): answered with the close
        assert b"connection: close" in (await read_answers(stream, 1))[0]
        assert await closed(stream) == b""


async def test_requests_before_the_client_s_end_are_all_answered() -> None:
    async with served() as port, await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"GET /a HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /b HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await stream.send_eof()
        got = await closed(stream)
        assert got.count(b"HTTP/1.1 200 ") == 2 and b"x-path: /a" in got and b"x-path: /b" in got, got


# --- a plain head's body read by the loop, against h11's reading of the same bytes ---------


def _recording_app(seen: list[tuple[object, ...]]) -> Any:
    """An app that records each request (method, path, headers, the body it read and how its
    reading ended) and answers with them: it reads the body whole (``/echo``), one message
    of it (``/one``) or none (any other path) before answering."""

    async def recording(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body, last = b"", ""
        if scope["path"] in ("/echo", "/one"):
            while True:
                message = await receive()
                body += message.get("body", b"")
                last = message["type"]
                if scope["path"] == "/one" or not message.get("more_body"):
                    break
        seen.append((scope["method"], scope["path"], scope["headers"], body, last))
        answer = b"%s %s %d %s" % (scope["method"].encode(), scope["path"].encode(), len(body), last.encode())
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer})

    return recording


def _serve_wire(chunks: list[bytes], *, plain: bool) -> tuple[bytes, bool, list[tuple[object, ...]]]:
    """What the loop writes to a client that sent ``chunks``, whether it ended the connection
    (always, once the client's end is read), and what the app saw; ``plain=False``: every
    head read by h11, as the loop read a body before the plain reader took bodies."""
    from appliance.services import h11_serving

    cfg = HypercornConfig()
    cfg.include_date_header = False
    cfg.include_server_header = False
    cfg.keep_alive_max_requests = 1000
    seen: list[tuple[object, ...]] = []
    wire = ScriptedConnection(chunks, keep=True)
    reader = h11_serving.plain_head if plain else (lambda data, limit: None)
    with patch.object(h11_serving, "plain_head", reader):
        trio.run(h11_serving.serve_h11, _recording_app(seen), cfg, h11_serving.IdleConnections(), {}, wire)
    return wire.written, wire.eof, seen


_bodies = st.sampled_from([b"", b"{}", b'{"kind":"print","body":{"n":1}}', b"x" * 300])
_length_fields = st.sampled_from([
    "{n}", "{n}", "{n}", "{n}", " {n} ", "+{n}", "0{n}", "{n}, {n}", "{n},{n}", "{n}\r\nContent-Length: {n}",
    "-1", "1{n}", "{n}\r\nTransfer-Encoding: chunked", "{n}\r\nExpect: 100-continue", "{n}\r\nContent-Length: 1",
    None, None])


@st.composite
def _conversations(draw: st.DrawFn) -> list[bytes]:
    """A client's bytes: requests (plain, nearly plain, with bodies announced in every way,
    some shorter than announced), then cut into reads at random places."""
    wire = b""
    for _ in range(draw(st.integers(1, 3))):
        method = draw(st.sampled_from(["POST", "PUT", "GET", "PATCH"]))
        path = draw(st.sampled_from(["/echo", "/one", "/early"]))
        body = draw(_bodies)
        length = draw(_length_fields)
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        if length is not None:
            head += "Content-Length: " + length.format(n=len(body)) + "\r\n"
        if "chunked" in (length or ""):
            body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
        wire += head.encode() + b"\r\n" + body
        if draw(st.integers(0, 5)) == 0:  # the body shorter than announced, then the client's end
            wire = wire[:len(wire) - draw(st.integers(1, max(1, len(body))))]
            break
    cuts = sorted(draw(st.lists(st.integers(0, len(wire)), max_size=5)))
    return [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True) if b > a]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=_conversations())
@example(chunks=[b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nab", b"c", b"de"])
@example(chunks=[b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nabc"])  # then the end: 400
@example(chunks=[b"POST /early HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nabcdeGET /one HTTP/1.1\r\n"
                 b"Host: 127.0.0.1\r\n\r\n"])
@example(chunks=[b"POST /early HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nab", b"cde"])
def test_a_plain_head_s_body_is_read_as_h11_reads_it(chunks: list[bytes]) -> None:
    """The same bytes, in the same reads, served with the plain reader and with h11 alone:
    the same answers (byte for byte), the same end of the connection, and each app saw the
    same requests and bodies (a body short of its length then the client's end: h11's 400
    either way; a body the app did not read: skipped if it had all arrived, else the end)."""
    assert _serve_wire(chunks, plain=True) == _serve_wire(chunks, plain=False), chunks


def test_an_app_learns_whether_a_plain_head_s_body_is_all_read() -> None:
    """``BODY_AT_HAND`` (the app then reads the body with no deadline): True only when every
    byte of a plain head's body is read already; absent for a head h11 read."""
    from appliance.services import h11_serving

    seen: list[object] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        at_hand = scope["extensions"].get(h11_serving.BODY_AT_HAND)
        seen.append(None if at_hand is None else at_hand())
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    head = b"POST /c HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\n"
    for chunks in ([head + b"hello"], [head + b"hel", b"lo"], [head, b"hello"], [head[:10], head[10:] + b"hello"],
                   [b"POST /c HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"]):
        wire = ScriptedConnection(chunks, keep=True)
        trio.run(h11_serving.serve_h11, app, HypercornConfig(), h11_serving.IdleConnections(), {}, wire)
        assert wire.written.startswith(b"HTTP/1.1 200 "), (chunks, wire.written)
    assert seen == [True, False, False, None, True]
