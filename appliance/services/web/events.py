"""The events listener (port 8001): the live, resumable event stream (docs/events.md).

- ``ws://box:8001/v1/events?topics=..&device=..&sku_prefix=..&after=N``: a WebSocket;
  the box sends ``subscribed``, then (``after`` given) every event after ``N`` in order,
  then live events; ``ping`` every ``[events] ping_interval_s``. The client must send
  something (``{"op": "pong"}``) at least every ``idle_timeout_s`` or is disconnected.
- ``GET /v1/events`` with the same parameters (or ``Last-Event-ID``): the same stream as
  Server-Sent Events, for clients that cannot open a WebSocket (``EventSource``).

Who may subscribe is decided by :func:`subscriber_grant` alone: the admin token (header
``Authorization: Bearer``, or ``token=`` in the query for a browser, which cannot set
headers on a WebSocket or an EventSource) sees everything.

A subscriber that falls behind (see ``appliance.services.event_hub``) gets ``slow`` with
the id to resume from, then the connection closes; one that stops reading altogether is
cut by the kernel after ``send_timeout_s`` (TCP_USER_TIMEOUT on the listener). On stop,
every connection gets ``closing`` and ends, so the listener stops at once.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Final

import trio
from starlette.applications import Starlette
from starlette.requests import HTTPConnection
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from appliance.protocol.event_stream import (
    Forbidden,
    Grant,
    Subscription,
    SubscriptionError,
    closing_message,
    coalesced,
    error_message,
    ping_message,
    resync_message,
    slow_message,
    sse_comment,
    sse_frame,
    subscribed_message,
)
from appliance.services.event_hub import Follower, TooSlow
from appliance.services.runtime import Runtime
from appliance.services.web.common import ApiError, service_app
from appliance.services.web.cors import origin_allowed
from appliance.services.web.device_auth import authenticate_device
from appliance.services.web.parts import WebParts

__all__ = ["WS_CLOSE", "create_app", "subscriber_grant"]

log = logging.getLogger(__name__)

# WebSocket close codes (RFC 6455 §7.4.1): 1008 policy (credential, origin, bad
# subscription), 1013 try again later (too slow, too many subscribers), 1001 going away
# (the box stops, or the client went silent).
WS_CLOSE: Final = {"policy": 1008, "again": 1013, "away": 1001}
# A client's message is a pong or a small command: anything bigger is not ours.
CLIENT_MESSAGE_MAX_CHARS: Final = 1024
# SSE: the browser waits this long before reconnecting after the stream ends.
SSE_RETRY_MS: Final = 2000


async def subscriber_grant(conn: HTTPConnection, runtime: Runtime) -> Grant:
    """What the credential of a subscription request (a WebSocket handshake or an SSE
    GET) may read; ApiError 401 (or 403, 429) if none.

    The one place that decides who may subscribe: an adopted device by its signature
    (docs/device-api.md), limited to its own device's events and store-wide ones; the
    admin token (the homepage, a technician's ``appliance events``) to everything."""
    headers, query = conn.headers, conn.query_params
    if "signature-input" in headers:
        device_id = await authenticate_device(conn, runtime)
        return Grant(admin=False, device_id=device_id, who=f"device {device_id}")
    scheme, _, value = headers.get("authorization", "").partition(" ")
    token = value.strip() if scheme.lower() == "bearer" else query.get("token", "")
    if token and hmac.compare_digest(token.encode(), runtime.admin_token.encode()):
        return Grant(admin=True, who="admin")
    raise ApiError(401, "a credential is required: a device signature (docs/device-api.md), or "
                        "Authorization: Bearer <admin token> (token=<admin token> in the query for a browser)")


async def _subscription(runtime: Runtime, conn: HTTPConnection) -> tuple[Subscription, trio.Event | None]:
    """The request's subscription as its credential may have it, and for a device the
    event set when its key is revoked (taken right after it was checked); raises ApiError."""
    headers, query = conn.headers, conn.query_params
    if len(query.multi_items()) != len(query):
        raise ApiError(400, "a query parameter is given twice")
    origin = headers.get("origin")
    if origin is not None and not origin_allowed(origin, host=headers.get("host", ""),
                                                 allowed=runtime.config.cors.allowed_origins):
        raise ApiError(403, f"origin {origin} may not open the event stream; add it to [cors] allowed_origins")
    grant = await subscriber_grant(conn, runtime)
    revoked = None if grant.admin else runtime.keys.revoked(grant.device_id)
    try:
        sub = Subscription.parse(dict(query), last_event_id=headers.get("last-event-id"))
        return sub.limited_to(grant), revoked
    except SubscriptionError as exc:
        raise ApiError(400, str(exc)) from exc
    except Forbidden as exc:
        raise ApiError(403, str(exc)) from exc


def _take_slot(runtime: Runtime) -> None:
    """One place among ``[events] max_subscribers`` (given back with ``subscribers -= 1``)."""
    limit = runtime.config.events.max_subscribers
    if runtime.event_hub.subscribers >= limit:
        raise ApiError(503, f"too many subscribers ({limit}); try again later")
    runtime.event_hub.subscribers += 1


def create_app(runtime: Runtime, parts: WebParts) -> Starlette:
    hub, cfg = runtime.event_hub, runtime.config.events

    def follower(sub: Subscription) -> tuple[Follower, bool]:
        cursor, resync = hub.start(sub)
        return Follower(hub=hub, db=runtime.db, sub=sub, cursor=cursor, max_lag_s=cfg.max_lag_s), resync

    async def stop_watch() -> None:
        await runtime.stopping.wait()
        hub.stop()

    async def revoke_watch(revoked: trio.Event | None, scope: trio.CancelScope) -> None:
        """A device's stream ends the moment its key is revoked, replaced or rejected."""
        if revoked is not None:
            await revoked.wait()
            scope.cancel()

    async def websocket_stream(ws: WebSocket) -> None:
        try:
            sub, revoked = await _subscription(runtime, ws)
            _take_slot(runtime)
        except ApiError as exc:
            await ws.accept()
            await ws.send_text(error_message(exc.status, exc.message))
            await ws.close(WS_CLOSE["again"] if exc.status == 503 else WS_CLOSE["policy"])
            return
        try:
            await ws.accept()
            await _serve_websocket(ws, sub, revoked)
        except WebSocketDisconnect:
            pass
        finally:
            hub.subscribers -= 1

    async def _serve_websocket(ws: WebSocket, sub: Subscription, revoked: trio.Event | None) -> None:
        f, resync = follower(sub)
        await ws.send_text(subscribed_message(sub, head=hub.head, oldest=hub.oldest))
        if resync:
            await ws.send_text(resync_message(sub, head=hub.head, oldest=hub.oldest))
        last_heard = trio.current_time()

        async def listen(scope: trio.CancelScope) -> None:
            nonlocal last_heard
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    scope.cancel()
                    return
                text = message.get("text") or message.get("bytes") or ""
                if len(text) > CLIENT_MESSAGE_MAX_CHARS:
                    await ws.close(WS_CLOSE["policy"], "client messages are small: a pong")
                    scope.cancel()
                    return
                last_heard = trio.current_time()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen, nursery.cancel_scope)
            nursery.start_soon(stop_watch)
            nursery.start_soon(revoke_watch, revoked, nursery.cancel_scope)
            try:
                while True:
                    if trio.current_time() - last_heard > cfg.idle_timeout_s:
                        await ws.close(WS_CLOSE["away"], f"nothing heard for {cfg.idle_timeout_s:g} s")
                        break
                    with trio.move_on_after(cfg.ping_interval_s) as timer:
                        batch = await f.next_batch()
                    if hub.stopping:
                        await ws.send_text(closing_message(resume_after=f.cursor))
                        await ws.close(WS_CLOSE["away"], "the box is stopping")
                        break
                    if timer.cancelled_caught:
                        await ws.send_text(ping_message(head=hub.head))
                        continue
                    if f.waited:  # a subscriber's own backlog says nothing of the box's pace
                        hub.dispatched(batch)
                    texts = [e.text for e in batch]
                    for text in coalesced(texts) if sub.coalesce and len(texts) > 1 else texts:
                        await ws.send({"type": "websocket.send", "text": text})
                    runtime.metrics.inc("event_messages_sent", len(batch))
            except TooSlow as exc:
                runtime.metrics.inc("event_subscribers_evicted")
                log.info("event subscriber too slow (%s); told to resume after %d", exc.reason, exc.resume_after)
                await ws.send_text(slow_message(resume_after=exc.resume_after, reason=exc.reason))
                await ws.close(WS_CLOSE["again"], "too slow")
            nursery.cancel_scope.cancel()
        if ws.application_state is WebSocketState.CONNECTED:
            await ws.close()

    async def sse_stream(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            sub, revoked = await _subscription(runtime, HTTPConnection(scope))
            _take_slot(runtime)
        except ApiError as exc:
            body = json.dumps({"error": exc.message}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            if exc.status == 401:
                headers.append((b"www-authenticate", b"Bearer"))
            await send({"type": "http.response.start", "status": exc.status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        try:
            await _serve_sse(sub, revoked, receive, send)
        finally:
            hub.subscribers -= 1

    async def _serve_sse(sub: Subscription, revoked: trio.Event | None, receive: Receive, send: Send) -> None:
        f, resync = follower(sub)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-store"),
            (b"x-accel-buffering", b"no")]})
        first = (f"retry: {SSE_RETRY_MS}\n\n".encode()
                 + sse_frame(subscribed_message(sub, head=hub.head, oldest=hub.oldest), event="subscribed"))
        if resync:
            first += sse_frame(resync_message(sub, head=hub.head, oldest=hub.oldest), event="resync")

        async def body(chunk: bytes) -> None:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

        async def until_disconnect(scope: trio.CancelScope) -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(until_disconnect, nursery.cancel_scope)
            nursery.start_soon(stop_watch)
            nursery.start_soon(revoke_watch, revoked, nursery.cancel_scope)
            await body(first)
            try:
                while True:
                    with trio.move_on_after(cfg.ping_interval_s) as timer:
                        batch = await f.next_batch()
                    if hub.stopping:
                        await body(sse_frame(closing_message(resume_after=f.cursor), event="closing"))
                        break
                    if timer.cancelled_caught:
                        await body(sse_comment(f"ping {hub.head}"))
                        continue
                    if batch:
                        # One write for the whole batch: SSE frames simply follow each other.
                        if f.waited:
                            hub.dispatched(batch)
                        await body(b"".join(sse_frame(e.text, event="message", id=e.id) for e in batch))
                        runtime.metrics.inc("event_messages_sent", len(batch))
            except TooSlow as exc:
                runtime.metrics.inc("event_subscribers_evicted")
                await body(sse_frame(slow_message(resume_after=exc.resume_after, reason=exc.reason), event="slow"))
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            nursery.cancel_scope.cancel()

    routes = [
        WebSocketRoute("/v1/events", websocket_stream),
        Route("/v1/events", _AsgiEndpoint(sse_stream), methods=["GET"]),
    ]
    return service_app("events", runtime, [*routes, *parts.routes_for(runtime)])


class _AsgiEndpoint:
    """A raw ASGI callable as a Starlette route endpoint (it streams its own response)."""

    def __init__(self, app: object) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)  # type: ignore[operator]
