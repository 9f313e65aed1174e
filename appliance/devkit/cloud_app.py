"""The simulator's ASGI app: docs/cloud-contract.md over HTTP, plus the test-only ``/_sim``.

Thin: it checks headers and sizes, reads bodies under their limits, and hands the bytes to
:class:`~appliance.devkit.cloud_state.CloudState`. Every error is JSON
``{"error", "reason"}``. :class:`FaultLayer` wraps the app and plays the fault plan
(status answers, latency, answers cut after the commit); the snapshot stream plays ``cut``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Final

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.devkit.cloud_blobs import blob_endpoint, stream_while_read
from appliance.devkit.cloud_catalog import COMPACT, Record
from appliance.devkit.cloud_faults import parse_fault
from appliance.devkit.cloud_logs import MAX_BATCH_BYTES as MAX_LOG_BATCH
from appliance.devkit.cloud_orders import SendOrder, make_order, push_orders
from appliance.devkit.cloud_state import CloudState, summarize
from appliance.devkit.cloud_wire import (
    CloudApiError,
    is_id,
    loads_strict,
    parse_cursor,
    parse_heartbeat,
    parse_limit,
    parse_mutation,
    parse_pair,
)
from appliance.services.timestamps import rfc3339

__all__ = ["FaultLayer", "build_app"]

SMALL_BODY: Final = 64 * 1024
LARGE_BODY: Final = 1024 * 1024
# A support bundle (docs/cloud-contract.md, "Support bundles").
BUNDLE_BODY: Final = 8 * 1024 * 1024
# Test-only bodies (mutations of a big catalog) may be larger than the contract's.
SIM_BODY: Final = 16 * 1024 * 1024
# An oversized body is drained up to this before the 413 (see read_json_body).
DRAIN_MAX: Final = 32 * 1024 * 1024
# Snapshot lines are sent in chunks of about this size: one write per chunk, bounded memory.
SNAPSHOT_CHUNK: Final = 64 * 1024
MAX_ORDERS_PER_CALL: Final = 1000

Clock = Callable[[], float]


def _error(exc: CloudApiError) -> JSONResponse:
    headers = dict(exc.headers)
    if exc.status in (429, 503) and "Retry-After" not in headers:
        headers["Retry-After"] = "1"
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def read_json_body(request: Request, limit: int) -> bytes:
    """The raw body, after the Content-Type and size checks (415, 413).

    An oversized body is read to its end (up to :data:`DRAIN_MAX`) and dropped before the
    413 goes out: answering while the client is still sending would reset the connection,
    and the client would see a transport error instead of the reason.
    """
    return await read_body(request, limit)


async def read_body(request: Request, limit: int, ctype: str = "application/json") -> bytes:
    """:func:`read_json_body` for a body of type ``ctype``."""
    got = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if got != ctype:
        raise CloudApiError(415, "unsupported_media_type", f"the body must be {ctype}, got {got or 'none'!r}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > DRAIN_MAX:
            break
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise CloudApiError(413, "body_too_large", f"the body is over the limit of {limit} bytes")
    return b"".join(chunks)


async def drain_request(request: Request) -> None:
    """Read what is left of the request body (up to DRAIN_MAX) before an early answer.

    Answering before the body is read makes the server close the connection while the
    client may still be sending; the client then sees a reset instead of the answer.
    """
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > DRAIN_MAX:
                return
    except (RuntimeError, ClientDisconnect):  # already read, or the client went away
        return


async def drain_receive(receive: Receive) -> None:
    """:func:`drain_request` for a raw ASGI ``receive``."""
    size = 0
    while size <= DRAIN_MAX:
        message = await receive()
        if message["type"] != "http.request":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class SnapshotStream(Response):
    """NDJSON, chunked, generated lazily; ``cut_after`` cuts the connection after that many lines."""

    media_type = "application/x-ndjson"

    def __init__(self, state: CloudState, cursor: str, records: Iterator[Record], *, cut_after: int | None) -> None:
        super().__init__(content=None, media_type=self.media_type)
        self.state = state
        # No Content-Length: the body is streamed (chunked transfer encoding).
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.cursor, self.records, self.cut_after = cursor, records, cut_after

    def _chunks(self) -> Iterator[bytes | None]:
        """Chunks of lines; ``None`` means: cut the connection here."""
        buffer: list[bytes] = []
        size = count = 0
        for record in self.records:
            if self.cut_after is not None and count >= self.cut_after:
                yield b"".join(buffer)
                yield None
                return
            line = COMPACT.encode({"entity": record.entity, "key": record.key, "data": record.data}).encode() + b"\n"
            buffer.append(line)
            size += len(line)
            count += 1
            if size >= SNAPSHOT_CHUNK:
                yield b"".join(buffer)
                buffer, size = [], 0
        if self.cut_after is not None and count >= self.cut_after:
            yield b"".join(buffer)
            yield None
            return
        buffer.append(json.dumps({"cursor": self.cursor, "count": count}).encode() + b"\n")
        yield b"".join(buffer)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A reader that goes away stops the generation (the server drops our sends silently).
        self.state.snapshot_streams += 1
        try:
            await stream_while_read(receive, partial(self._stream, send))
        finally:
            self.state.snapshot_streams -= 1

    async def _stream(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        for chunk in self._chunks():
            if chunk is None:
                # Returning without the final empty body message makes the server close the
                # connection mid-body: the reader sees an incomplete chunked stream.
                return
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            # Let other tasks run between chunks (the catalog may be large).
            await trio.lowlevel.checkpoint()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def build_app(state: CloudState, *, clock: Clock = time.time, send_order: SendOrder | None = None) -> ASGIApp:
    """The simulator's app over ``state``; ``send_order`` feeds ``POST /_sim/orders``."""

    async def pair(request: Request) -> Response:
        request_body = parse_pair(await read_json_body(request, SMALL_BODY))
        return JSONResponse(state.pair(request_body))

    async def changes(request: Request) -> Response:
        state.authenticate(request.headers.get("authorization"), store_id=request.path_params["store"])
        cursor = parse_cursor(request.query_params.get("cursor"))
        limit = parse_limit(request.query_params.get("limit"))
        return JSONResponse(state.changes(cursor, limit))

    async def snapshot(request: Request) -> Response:
        state.authenticate(request.headers.get("authorization"), store_id=request.path_params["store"])
        cut = state.faults.take("cut", request.method, request.url.path)
        cursor, records = state.snapshot()
        return SnapshotStream(state, cursor, records, cut_after=cut.after_lines if cut else None)

    async def events(request: Request) -> Response:
        token = state.authenticate(request.headers.get("authorization"), store_id=request.path_params["store"])
        raw = await read_json_body(request, LARGE_BODY)
        answer, replayed = state.post_events(token, request.headers.get("idempotency-key"), raw, clock())
        return JSONResponse(answer, headers={"Idempotent-Replayed": "true"} if replayed else None)

    async def heartbeat(request: Request) -> Response:
        token = state.authenticate(request.headers.get("authorization"), store_id=request.path_params["store"])
        body = parse_heartbeat(await read_json_body(request, SMALL_BODY))
        return JSONResponse(state.heartbeat(token, body, clock()))

    async def support(request: Request) -> Response:
        appliance_id, request_id = request.path_params["appliance"], request.path_params["request_id"]
        token = state.authenticate(request.headers.get("authorization"), appliance_id=appliance_id)
        if not is_id(request_id):
            raise CloudApiError(404, "not_found", "request ids are 1 to 128 characters of A-Z a-z 0-9 . _ : -")
        body = loads_strict(await read_json_body(request, LARGE_BODY))
        if not isinstance(body, dict):
            raise CloudApiError(400, "invalid_body", "a support reply is a JSON object")
        return JSONResponse(state.support_reply(token, request_id, body, clock()))

    async def support_bundle(request: Request) -> Response:
        appliance_id, request_id = request.path_params["appliance"], request.path_params["request_id"]
        token = state.authenticate(request.headers.get("authorization"), appliance_id=appliance_id)
        if not is_id(request_id):
            raise CloudApiError(404, "not_found", "request ids are 1 to 128 characters of A-Z a-z 0-9 . _ : -")
        data = await read_body(request, BUNDLE_BODY, "application/gzip")
        return JSONResponse(state.support_bundle(token, request_id, data, clock()))

    async def log_input(request: Request) -> Response:
        raw = await read_body(request, MAX_LOG_BATCH)
        return JSONResponse(state.logs.take(request.headers.get("x-api-key"),
                                            request.headers.get("content-encoding", ""), raw))

    async def blob(request: Request) -> Response:
        return await blob_endpoint(state, request)

    async def sim_blobs(request: Request) -> Response:
        return JSONResponse({"bytes_sent": state.blob_bytes_sent,
                             "requests": [{"key": k, "range": r} for k, r in state.blob_requests]})

    # -- /_sim: tests and the demo only ----------------------------------------------------------

    async def sim_mutate(request: Request) -> Response:
        seqs = state.mutate(parse_mutation(await read_json_body(request, SIM_BODY)))
        return JSONResponse({"cursor": state.cursor, "seqs": seqs})

    async def sim_faults(request: Request) -> Response:
        if request.method == "DELETE":
            state.faults.clear()
        elif request.method == "POST":
            state.faults.add(parse_fault(await read_json_body(request, SMALL_BODY)))
        return JSONResponse({"faults": state.faults.pending()})

    async def sim_revoke(request: Request) -> Response:
        body = loads_strict(await read_json_body(request, SMALL_BODY))
        if not isinstance(body, dict) or set(body) - {"token"} or not isinstance(body.get("token", ""), str):
            raise CloudApiError(400, "invalid_body", 'the body is {} (every token) or {"token": "..."}')
        return JSONResponse({"revoked": state.revoke(body.get("token"))})

    async def sim_events(request: Request) -> Response:
        stored = [{**s.event, "received_at": s.received_at, "idempotency_key": s.idempotency_key}
                  for s in state.events.values()]
        return JSONResponse({"count": len(stored), "events": stored,
                             "idempotency_keys": state.idempotency_keys_seen,
                             "redelivered": {k: n for k, n in state.deliveries.items() if n > 1}})

    async def sim_heartbeats(request: Request) -> Response:
        return JSONResponse({"count": len(state.heartbeats), "heartbeats": list(state.heartbeats)})

    async def sim_firmware(request: Request) -> Response:
        if request.method == "DELETE":
            state.withdraw_firmware()
            return JSONResponse({"firmware": None})
        body = loads_strict(await read_json_body(request, SMALL_BODY))
        version, path = (body.get("version"), body.get("path")) if isinstance(body, dict) else (None, None)
        sha256 = body.get("sha256", "") if isinstance(body, dict) else ""
        if not isinstance(version, str) or not isinstance(path, str) or not isinstance(sha256, str):
            raise CloudApiError(400, "invalid_body", 'the body is {"version": "...", "path": "<file on this host>"}')
        try:
            content = await trio.to_thread.run_sync(Path(path).read_bytes)
        except OSError as exc:
            raise CloudApiError(400, "invalid_body", f"cannot read {path}: {exc.strerror or exc}") from exc
        return JSONResponse({"firmware": state.offer_firmware(version, content, sha256=sha256)})

    async def sim_support(request: Request) -> Response:
        return JSONResponse({"count": len(state.support), "replies": state.support})

    async def sim_bundles(request: Request) -> Response:
        return JSONResponse({rid: {k: v for k, v in b.items() if k != "data"} for rid, b in state.bundles.items()})

    async def sim_logs(request: Request) -> Response:
        return JSONResponse(state.logs.summary())

    async def sim_catalog(request: Request) -> Response:
        # Digesting a large catalog takes a while: do it off the event loop.
        # The snapshot is taken here, on the loop; the thread only reads its frozen copy.
        return JSONResponse(await trio.to_thread.run_sync(summarize, *state.snapshot()))

    async def sim_backoffice(request: Request) -> Response:
        return JSONResponse(state.backoffice())

    async def sim_orders(request: Request) -> Response:
        body = loads_strict(await read_json_body(request, SMALL_BODY))
        count = body.get("count") if isinstance(body, dict) else None
        first = body.get("first", 1) if isinstance(body, dict) else None
        if (not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_ORDERS_PER_CALL
                or not isinstance(first, int) or isinstance(first, bool) or first < 1):
            raise CloudApiError(400, "invalid_body", f'the body is {{"count": 1..{MAX_ORDERS_PER_CALL}, "first": n}}')
        if send_order is None:
            raise CloudApiError(409, "no_order_sink", "this simulator was started without a Service Bus sender")
        now = rfc3339(clock())
        orders = [make_order(state.catalog, n, created_at=now) for n in range(first, first + count)]
        sent = await push_orders(send_order, orders)
        return JSONResponse({"sent": sent, "order_ids": [o.order_id for o in orders]})

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, CloudApiError)
        await drain_request(request)
        return _error(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        await drain_request(request)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        reason = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else exc.detail
        return JSONResponse({"error": code, "reason": reason}, status_code=exc.status_code, headers=exc.headers)

    routes = [
        Route("/v1/appliances/pair", pair, methods=["POST"]),
        Route("/v1/stores/{store}/changes", changes, methods=["GET"]),
        Route("/v1/stores/{store}/snapshot", snapshot, methods=["GET"]),
        Route("/v1/stores/{store}/events", events, methods=["POST"]),
        Route("/v1/stores/{store}/heartbeat", heartbeat, methods=["POST"]),
        Route("/v1/appliances/{appliance}/support/{request_id}", support, methods=["POST"]),
        Route("/v1/appliances/{appliance}/support/{request_id}/bundle", support_bundle, methods=["PUT"]),
        Route("/v1/input", log_input, methods=["POST"]),
        Route("/blob/{store}/{key:path}", blob, methods=["GET"]),
        Route("/_sim/mutate", sim_mutate, methods=["POST"]),
        Route("/_sim/faults", sim_faults, methods=["GET", "POST", "DELETE"]),
        Route("/_sim/revoke", sim_revoke, methods=["POST"]),
        Route("/_sim/events", sim_events, methods=["GET"]),
        Route("/_sim/heartbeats", sim_heartbeats, methods=["GET"]),
        Route("/_sim/support", sim_support, methods=["GET"]),
        Route("/_sim/logs", sim_logs, methods=["GET"]),
        Route("/_sim/bundles", sim_bundles, methods=["GET"]),
        Route("/_sim/catalog", sim_catalog, methods=["GET"]),
        Route("/_sim/backoffice", sim_backoffice, methods=["GET"]),
        Route("/_sim/orders", sim_orders, methods=["POST"]),
        Route("/_sim/blobs", sim_blobs, methods=["GET"]),
        Route("/_sim/firmware", sim_firmware, methods=["POST", "DELETE"]),
    ]
    app = Starlette(routes=routes, exception_handlers={CloudApiError: api_error, HTTPException: http_error})
    return FaultLayer(app, state)


class FaultLayer:
    """Plays the fault plan in front of ``app`` (``/_sim`` is never faulted)."""

    def __init__(self, app: ASGIApp, state: CloudState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/_sim"):
            await self.app(scope, receive, send)
            return
        method, path, plan = scope["method"], scope["path"], self.state.faults
        latency = plan.take("latency", method, path)
        if latency is not None:
            await trio.sleep(latency.delay_s)
        status = plan.take("status", method, path)
        if status is not None:
            names = {429: "rate_limited", 503: "unavailable"}
            headers = {"Retry-After": str(status.retry_after)} if status.status in (429, 503) else {}
            exc = CloudApiError(status.status, names.get(status.status, "injected_fault"),
                           f"injected fault: {status.status}", headers=headers)
            await drain_receive(receive)
            await _error(exc)(scope, receive, send)
            return
        if plan.take("drop", method, path) is None:
            await self.app(scope, receive, send)
            return
        # Handle (and commit) the request, then cut the connection before the answer's body.
        start: Message | None = None

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message

        await self.app(scope, receive, capture)
        if start is not None:
            await send(start)
