"""The TLS WebSocket front of the Service Bus test double (see :mod:`tests.amqp.peer`).

Service Bus' production transport for the appliance is AMQP over WebSockets:
``wss://<namespace>:443/$servicebus/websocket`` with the ``AMQPWSB10`` subprotocol. This
endpoint accepts exactly that (other paths get 404, a missing subprotocol 400) and bridges
each connection's binary WebSocket messages to a fresh TCP connection to the proton peer:
the client's bytes as they are, the peer's with every performative padded to all its fields
(:mod:`tests.amqp.frames`: Service Bus sends them whole, and the SDK before 7.15 relies on
it). When either side ends, the other is closed, so the peer sees a client that
goes away as a dropped connection (and redelivers its locked messages).
"""

from __future__ import annotations

import ssl
import sys

import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    WebSocketServer,
    serve_websocket,
)

from tests.amqp.frames import FrameError, PerformativePadder

__all__ = ["PATH", "SUBPROTOCOL", "serve_front"]

PATH = "/$servicebus/websocket"
SUBPROTOCOL = "AMQPWSB10"
# AMQP frames are small here; 1 MiB (trio-websocket's default) bounds one message.
_MAX_MESSAGE = 1 << 20
_READ_CHUNK = 65536
_CLOSE_TIMEOUT_S = 2.0


async def serve_front(
    host: str,
    port: int,
    ssl_context: ssl.SSLContext,
    amqp_port: int,
    *,
    task_status: trio.TaskStatus[WebSocketServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; ``task_status.started()`` gets the bound server (``.port``)."""

    async def handle(request: WebSocketRequest) -> None:
        if request.path != PATH:
            await request.reject(404, body=f"only {PATH} is served here".encode())
            return
        if SUBPROTOCOL not in request.proposed_subprotocols:
            await request.reject(400, body=f"subprotocol {SUBPROTOCOL} is required".encode())
            return
        ws = await request.accept(subprotocol=SUBPROTOCOL)
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", amqp_port)
        except OSError:
            await ws.aclose(code=1011, reason="the AMQP peer is not reachable")
            return
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(_ws_to_tcp, ws, stream, nursery.cancel_scope)
            nursery.start_soon(_tcp_to_ws, stream, ws, nursery.cancel_scope)

    await serve_websocket(
        handle,
        host,
        port,
        ssl_context,
        max_message_size=_MAX_MESSAGE,
        disconnect_timeout=_CLOSE_TIMEOUT_S,
        task_status=task_status,
    )


async def _ws_to_tcp(ws: WebSocketConnection, stream: trio.SocketStream, done: trio.CancelScope) -> None:
    try:
        while True:
            message = await ws.get_message()
            if isinstance(message, str):  # AMQP over WebSockets is binary only
                await ws.aclose(code=1003, reason="binary messages only")
                break
            await stream.send_all(message)
    except (ConnectionClosed, trio.BrokenResourceError):
        pass
    done.cancel()  # leaving the nursery closes the TCP stream: the peer sees a drop


async def _tcp_to_ws(stream: trio.SocketStream, ws: WebSocketConnection, done: trio.CancelScope) -> None:
    padder = PerformativePadder()
    try:
        while data := await stream.receive_some(_READ_CHUNK):
            if out := padder.feed(data):
                await ws.send_message(out)
        with trio.move_on_after(_CLOSE_TIMEOUT_S):
            await ws.aclose()
    except FrameError as exc:  # the peer's own bytes: a bug of the test double, said loudly
        print(f"wsfront: closing a connection: {exc}", file=sys.stderr, flush=True)
        with trio.move_on_after(_CLOSE_TIMEOUT_S):
            await ws.aclose(code=1011, reason=f"the AMQP peer sent what the front cannot pad: {exc}"[:120])
    except (ConnectionClosed, trio.BrokenResourceError):
        pass
    done.cancel()
