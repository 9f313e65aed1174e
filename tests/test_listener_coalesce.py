"""The store API's listener sends a response head with its body in one write
(appliance/services/http.py, ``_Connection``), and never holds a head that may wait."""

from __future__ import annotations

from typing import Any

import httpx
import trio

from appliance.services.http import ConnectionCaps, _Connection
from appliance.services.runtime import Runtime
from tests.sync_helpers import StartBox, api_client

pytest_plugins = ["tests.sync_fixtures"]

HEAD = b"HTTP/1.1 200 \r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n"


class Recorder:
    """Stands in for the socket stream: records each write."""

    def __init__(self) -> None:
        self.socket: Any = None
        self.writes: list[bytes] = []

    async def send_all(self, data: Any) -> None:
        await trio.lowlevel.checkpoint()
        self.writes.append(bytes(data))

    async def send_eof(self) -> None:
        self.writes.append(b"<eof>")


def connection(coalesce: bool) -> tuple[_Connection, Recorder]:
    stream = Recorder()
    return _Connection(stream, ConnectionCaps(total=1, per_source=1), "x", coalesce=coalesce), stream  # type: ignore[arg-type]


async def test_a_sized_head_leaves_with_its_body() -> None:
    conn, stream = connection(True)
    await conn.send_all(HEAD)
    assert stream.writes == []
    await conn.send_all(b"{}")
    await conn.send_all(b"")  # h11's EndOfMessage
    assert stream.writes == [HEAD + b"{}", b""]


async def test_a_head_with_no_body_after_it_leaves_with_the_end_of_the_message() -> None:
    conn, stream = connection(True)  # an answer to HEAD: the body is never written
    await conn.send_all(HEAD)
    await conn.send_all(b"")
    assert stream.writes == [HEAD]


async def test_heads_that_may_wait_are_not_held() -> None:
    conn, stream = connection(True)
    chunked = b"HTTP/1.1 200 \r\ntransfer-encoding: chunked\r\n\r\n"
    empty = b"HTTP/1.1 204 \r\ncontent-length: 0\r\n\r\n"
    await conn.send_all(chunked)
    await conn.send_all(empty)
    await conn.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert stream.writes == [chunked, empty, b"HTTP/1.1 100 Continue\r\n\r\n"]
    off, plain = connection(False)  # every other listener
    await off.send_all(HEAD)
    assert plain.writes == [HEAD]


async def test_a_held_head_goes_before_the_eof() -> None:
    conn, stream = connection(True)
    await conn.send_all(HEAD)
    await conn.send_eof()
    assert stream.writes == [HEAD, b"<eof>"]


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
