"""Helpers for the event-stream tests: the real `appliance run` process with ports chosen by
the kernel, a subscriber that collects events, and store API writes that cause events."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
from trio_websocket import WebSocketConnection, wrap_client_stream

from tests.realbox import loopback_config

TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def box_toml(tmp_path: Path, extra: str = "") -> Path:
    return loopback_config(tmp_path, token=TOKEN, tables=f'[cloud]\napi_url = "https://127.0.0.1:9"\n{extra}\n')


@attrs.define
class BoxProcess:
    proc: subprocess.Popen[bytes]
    ports: dict[str, int]
    log: Path

    def url(self, role: str, path: str = "") -> str:
        return f"http://127.0.0.1:{self.ports[role]}{path}"

    def ws(self, query: str) -> str:
        return f"ws://127.0.0.1:{self.ports['events']}/v1/events?{query}"

    def stream(self, query: str, **kwargs: Any) -> Any:
        """``async with box.stream("topics=..."):`` a WebSocket to the event stream."""
        return ws_connect(self.ports["events"], f"/v1/events?{query}", **kwargs)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


def start_box(cfg: Path, log: Path, timeout: float = 30.0) -> BoxProcess:
    """``appliance run`` as its own process; returns once its ready line names its ports."""
    with log.open("a") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config", str(cfg)], stderr=stderr,
                                env={**os.environ, "NOTIFY_SOCKET": ""})
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text()
        lines = [line for line in text.splitlines() if "ready: " in line]
        if lines:
            ports = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", lines[-1].split("ready: ", 1)[1])}
            return BoxProcess(proc=proc, ports=ports, log=log)
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the box did not start:\n{text[-3000:]}")
        time.sleep(0.05)


@contextmanager
def box_process(tmp_path: Path, extra: str = "") -> Iterator[BoxProcess]:
    box = start_box(box_toml(tmp_path, extra), tmp_path / "box.log")
    try:
        yield box
    finally:
        if box.proc.poll() is None:
            box.proc.send_signal(signal.SIGTERM)
            try:
                box.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                box.proc.kill()
                box.proc.wait()


def sale(sale_id: str, *, lines: int = 1) -> dict[str, Any]:
    items = [{"sku": f"SKU-{i:06d}", "qty": 1, "unit_price_cents": 100} for i in range(lines)]
    return {"id": sale_id, "device_id": "pos-1", "currency": "EUR", "total_cents": 100 * lines, "lines": items,
            "payments": [{"method": "card", "amount_cents": 100 * lines}]}


async def post_sales(api: str, ids: list[str], *, lines: int = 1) -> None:
    async with httpx.AsyncClient(base_url=api, headers=AUTH, timeout=30) as client:
        for sale_id in ids:
            answer = await client.post("/v1/sales", json=sale(sale_id, lines=lines))
            assert answer.status_code == 201, answer.text


# How long a test waits for one message before it fails (a loaded CI machine is slow).
WAIT_S = 15.0


async def next_message(ws: WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(WAIT_S):
        message = json.loads(await ws.get_message())
    assert isinstance(message, dict)
    return message


async def next_event(ws: WebSocketConnection) -> dict[str, Any]:
    """The next event message (control messages such as pings are skipped)."""
    while True:
        message = await next_message(ws)
        if "id" in message:
            return message


async def events(ws: WebSocketConnection, count: int) -> list[dict[str, Any]]:
    return [await next_event(ws) for _ in range(count)]


async def sse_read(port: int, target: str, headers: dict[str, str], *, count: int) -> tuple[int, list[tuple[str, str]]]:
    """GET ``target`` as an EventSource would (h11 on a plain socket, so nothing is left
    half-read) and return the status and the first ``count`` frames as (event, data)."""
    import h11

    conn = h11.Connection(h11.CLIENT)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    frames: list[tuple[str, str]] = []
    async with stream:
        request = h11.Request(method="GET", target=target, headers=[
            ("Host", f"127.0.0.1:{port}"), ("Accept", "text/event-stream"), *headers.items()])
        await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        status, buffer = 0, b""
        with trio.fail_after(WAIT_S):
            while len(frames) < count:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    if status != 200:
                        return status, frames
                elif isinstance(event, h11.Data):
                    buffer += bytes(event.data)
                    while b"\n\n" in buffer:
                        raw, buffer = buffer.split(b"\n\n", 1)
                        fields = dict(line.split(": ", 1) for line in raw.decode().splitlines()
                                      if ": " in line and not line.startswith(":"))
                        if "data" in fields:
                            frames.append((fields.get("event", "message"), fields["data"]))
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
    return status, frames


@asynccontextmanager
async def ws_connect(port: int, resource: str, *, extra_headers: list[tuple[str, str]] | None = None,
                     rcvbuf: int = 0, message_queue_size: int = 64) -> AsyncIterator[WebSocketConnection]:
    """A WebSocket client on a stream this helper closes itself (trio-websocket's own client
    leaves its socket to the garbage collector when the server closes first). ``rcvbuf``:
    a small receive buffer, for a client that stops reading."""
    sock = trio.socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    stream = trio.SocketStream(sock)
    try:
        await sock.connect(("127.0.0.1", port))
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(nursery, stream, "127.0.0.1", resource, extra_headers=extra_headers,
                                          message_queue_size=message_queue_size)
            try:
                yield ws
            finally:
                nursery.cancel_scope.cancel()
    finally:
        await stream.aclose()
