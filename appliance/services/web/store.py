"""The store API on the api listener (port 8000): the replica for devices, sales and orders in.

Reads (the local replica; they work with the internet down):

- ``GET /v1/products/{sku}``, ``GET /v1/prices/{sku}``, ``GET /v1/stock/{sku}``
- ``GET /v1/products?prefix=NAME&limit=N&after=TOKEN``: products whose name starts with
  NAME (case-insensitive), by name, N per page (at most
  :data:`~appliance.storage.catalog.PRODUCT_PAGE_MAX`); ``next`` is the token of the
  next page (keyset paging: stable while the catalog changes).

Writes (store-and-forward to the platform):

- ``POST /v1/sales``, ``POST /v1/orders``: validated (422 with path-named errors),
  durable before the 201, idempotent on the device's ``id``: the same id with the same
  body answers 200 with the stored record and queues nothing new; the same id with
  another body answers 409. Each new record queues its platform event in the same
  transaction.
- ``GET /v1/sales/{id}``, ``GET /v1/orders/{id}``: the record and where its upload stands.

Devices sign each request with their own key (docs/device-api.md; checked by
:func:`~appliance.services.web.device_auth.authenticate`): an adopted device may read the
catalog and post and read its own sales and orders; a record whose ``device_id`` is not
the signer's is refused (403). The admin bearer token is accepted too, for back-office
tools; devices never need it. Bodies are bounded by ``[http] max_body_bytes``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from functools import partial
from typing import Any, Final

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import Receive, Scope, Send

from appliance.protocol.openapi import Operation, Param, Reply
from appliance.protocol.store_api import (
    RECORD_MAX_BYTES,
    InvalidRecord,
    ListedOrder,
    Order,
    OrderAnswer,
    Price,
    Product,
    ProductPage,
    Sale,
    SaleAnswer,
    Stock,
    Upload,
    canonical,
    canonical_json,
    event_id_of,
    event_of,
    parse_order,
    parse_sale,
)
from appliance.services.runtime import Runtime
from appliance.services.timestamps import rfc3339
from appliance.services.web.common import ApiError, answer_in_front, from_browser, parse_json, whole_number
from appliance.services.web.contract import ADMIN, DEVICE, BodyResponse, Documented, errors, path_param
from appliance.services.web.device_auth import authenticate
from appliance.services.web.kit import JsonResponse
from appliance.services.web.parts import WebParts
from appliance.storage.catalog import (
    PRODUCT_PAGE_MAX,
    BadPageToken,
    decode_after,
    get_item_text,
    search_products,
    sync_state,
)
from appliance.storage.events import Receipt, Received, get_received, receive, upload_state
from appliance.storage.orders import get_order, route_device_order

__all__ = ["READS", "CatalogReads", "JsonResponse", "api_parts", "read_one", "routes"]

PRODUCT_PAGE_DEFAULT: Final = 50
# A name prefix longer than any product name is a mistake, not a search.
PREFIX_MAX_CHARS: Final = 200


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    value = whole_number(raw, lo, hi)
    if value is None:
        raise ApiError(400, f"{name} must be an integer from {lo} to {hi}", [f"query.{name}: got {raw!r:.40}"])
    return value


def routes(runtime: Runtime) -> Sequence[BaseRoute]:
    db = runtime.db
    max_body = runtime.config.http.max_body_bytes

    def one(entity: str, label: str) -> Any:
        async def handler(request: Request) -> Response:
            return await read_one(runtime, request, entity=entity, label=label, sku=request.path_params["sku"])

        return handler

    async def search(request: Request) -> Response:
        await authenticate(request, runtime)
        prefix = request.query_params.get("prefix", "")
        if len(prefix) > PREFIX_MAX_CHARS:
            raise ApiError(400, f"prefix is longer than {PREFIX_MAX_CHARS} characters")
        try:
            prefix.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ApiError(400, "prefix is not valid text") from exc
        limit = _int_param(request, "limit", PRODUCT_PAGE_DEFAULT, 1, PRODUCT_PAGE_MAX)
        after_raw = request.query_params.get("after")
        try:
            after = decode_after(after_raw) if after_raw else None
        except BadPageToken as exc:
            raise ApiError(400, f"after: {exc}; use the 'next' value of the previous page") from exc
        items, token = await db.read(partial(search_products, prefix=prefix, limit=limit, after=after))
        return JsonResponse({"items": items, "next": token})

    async def post(request: Request, kind: str) -> Response:
        caller = await authenticate(request, runtime, body_limit=min(max_body, RECORD_MAX_BYTES))
        body = parse_json(caller.body)
        try:
            record: Sale | Order = parse_sale(body) if kind == "sale" else parse_order(body)
        except InvalidRecord as exc:
            raise ApiError(422, f"not a valid {kind}", exc.errors) from exc
        caller.require(record.device_id, f"a {kind}'s device_id")
        now = time.time()
        stored = canonical_json(canonical(record))
        event = event_of(record, received_at=rfc3339(now))
        routing = runtime.config.orders.routing

        def write(conn: sqlite3.Connection) -> tuple[Receipt, int]:
            # One transaction: the record, its event for the platform and, for an order,
            # the commands that take it to the kitchen screens and printers.
            receipt = receive(conn, kind=kind, id=record.id, device_id=record.device_id, body=stored,
                              event_id=event["id"], event_body=canonical_json(event), now=now)
            if kind != "order" or receipt.outcome is not Received.CREATED:
                return receipt, 0
            sent = route_device_order(conn, order_id=record.id, order=json.loads(stored),
                                      from_device=record.device_id, configured=routing, now=now)
            return receipt, len(sent)

        receipt, commands = await db.write(write)
        if receipt.outcome is Received.CONFLICT:
            runtime.metrics.inc("store_api_conflicts", kind=kind)
            raise ApiError(409, f"{kind} id {record.id!r} was already received with a different body; "
                                "a new record needs a new id")
        if receipt.outcome is Received.CREATED:
            runtime.metrics.inc("store_api_received", kind=kind)
            runtime.uplink_changes.notify()
            if commands:
                runtime.outbox_changes.notify()
        answer = await _answer(runtime, kind, record.id, receipt.body, receipt.received_at)
        return BodyResponse(answer, status_code=201 if receipt.outcome is Received.CREATED else 200)

    async def get_record(request: Request, kind: str) -> Response:
        caller = await authenticate(request, runtime)
        record_id = request.path_params["id"]
        if kind == "order" and (online := await db.read(partial(get_order, order_id=record_id))) is not None:
            # An order placed online (Service Bus): answered as GET /v1/orders lists it. It
            # reaches devices as commands; this route gives it to the admin's tools only.
            if not caller.is_admin:
                raise ApiError(403, "an online order is for the admin's tools; devices get it as a command")
            return JsonResponse(online | {"received_at": rfc3339(online["received_at"])})
        receipt = await db.read(partial(get_received, kind=kind, id=record_id))
        if receipt is None:
            raise ApiError(404, f"no {kind} with id {record_id!r} on this box")
        caller.require(json.loads(receipt.body).get("device_id"), f"the {kind}'s device_id")
        return BodyResponse(await _answer(runtime, kind, record_id, receipt.body, receipt.received_at))

    return [
        Documented("/v1/products", search, method="GET", operation=SEARCH),
        Documented("/v1/products/{sku:path}", one("product", "product"), method="GET", operation=_read(Product)),
        Documented("/v1/prices/{sku:path}", one("price", "price"), method="GET", operation=_read(Price)),
        Documented("/v1/stock/{sku:path}", one("stock", "stock record"), method="GET", operation=_read(Stock)),
        Documented("/v1/sales", partial(post, kind="sale"), method="POST", operation=_post(Sale, SaleAnswer)),
        Documented("/v1/sales/{id}", partial(get_record, kind="sale"), method="GET",
                   operation=_get_record(SaleAnswer, "sale")),
        Documented("/v1/orders", partial(post, kind="order"), method="POST", operation=_post(Order, OrderAnswer)),
        Documented("/v1/orders/{id}", partial(get_record, kind="order"), method="GET",
                   operation=_get_record(OrderAnswer, "order")),
    ]


# --- the operations, as docs/store-api.md and GET /v1/openapi.json show them ------------------

_WHO: Final = (DEVICE, ADMIN)
SEARCH: Final = Operation(
    summary="Products whose name starts with a prefix, by name, one page at a time", tag="catalog",
    description="Keyset paging: pass the page's `next` as `after` for the next page; stable while the catalog "
                "changes. Case-insensitive.",
    params=(Param(name="prefix", where="query", description="the start of the name (empty: every product)",
                  schema={"type": "string", "maxLength": PREFIX_MAX_CHARS}),
            Param(name="limit", where="query", description="products per page",
                  schema={"type": "integer", "minimum": 1, "maximum": PRODUCT_PAGE_MAX,
                          "default": PRODUCT_PAGE_DEFAULT}),
            Param(name="after", where="query", description="the `next` of the previous page")),
    replies=(Reply(status=200, description="one page", body=ProductPage), *errors(400, 401, 403, 429)),
    security=_WHO)


def _read(kind: type[msgspec.Struct]) -> Operation:
    what = kind.__name__.lower()
    return Operation(
        summary=f"One {what} record from the box's copy of the catalog (works with the internet down)",
        tag="catalog", params=(path_param("sku", "the product's SKU"),),
        replies=(Reply(status=200, description=f"the {what} record as the platform sent it", body=kind),
                 *errors(401, 403, 404, 429, 503, e404=f"no {what} for this SKU",
                         e503="the box has no copy of the catalog yet (it syncs once paired and online)")),
        security=_WHO)


def _post(kind: type[msgspec.Struct], answer: type[msgspec.Struct]) -> Operation:
    what = kind.__name__.lower()
    return Operation(
        summary=f"Take {'an' if what[0] in 'aeiou' else 'a'} {what} (durable before the answer; idempotent on its id)",
        tag="records", body=kind,
        description=f"201: stored now, and its platform event queued in the same transaction. 200: the same id "
                    f"with the same body was stored before; nothing new is queued. 409: the id was used for "
                    f"another body. A device may post only its own {what}s (`device_id`).",
        replies=(Reply(status=201, description=f"the {what} was stored", body=answer),
                 Reply(status=200, description=f"this {what} was stored before", body=answer),
                 *errors(400, 401, 403, 408, 409, 413, 422, 429,
                         e400="the body is not JSON, or beyond the box's JSON bounds (nesting, number size)")),
        security=_WHO)


def _get_record(answer: type[msgspec.Struct], what: str) -> Operation:
    online = " An order placed online answers with the online order (admin only)." if what == "order" else ""
    body = (answer, ListedOrder) if what == "order" else answer
    return Operation(
        summary=f"A {what} the box received, and where its upload stands", tag="records",
        description=f"A device reads its own {what}s only.{online}",
        params=(path_param("id", f"the {what}'s id"),),
        replies=(Reply(status=200, description=f"the {what}", body=body),
                 *errors(401, 403, 404, 429)),
        security=_WHO)


# --- the catalog reads, and their way around the router -----------------------------------------

# Path prefix -> (replica entity, the word for one record): GET <prefix><sku>.
READS: Final = {"/v1/products/": ("product", "product"), "/v1/prices/": ("price", "price"),
                "/v1/stock/": ("stock", "stock record")}


async def read_one(runtime: Runtime, request: Request, *, entity: str, label: str, sku: str) -> Response:
    """``GET /v1/<entity>/{sku}``: the hot path of every till's scan. Raises ApiError."""
    await authenticate(request, runtime)
    return Response(await _record_json(runtime, entity, label, sku), media_type="application/json")


async def _record_json(runtime: Runtime, entity: str, label: str, sku: str) -> bytes:
    """One record's answer: one indexed row read in trio's thread (no worker-thread hop), the
    platform's JSON decoded and encoded by msgspec; the first-sync check only on a miss.
    Raises ApiError."""
    text = await runtime.db.read_small(partial(get_item_text, entity=entity, key=sku))
    if text is not None:
        try:
            item = msgspec.json.decode(text)
            item["sku"] = sku
            return msgspec.json.encode(item)
        except (msgspec.DecodeError, UnicodeEncodeError, TypeError):
            # A lone surrogate the platform sent: JsonResponse escapes it.
            return bytes(JsonResponse(json.loads(text) | {"sku": sku}).body)
    if (await runtime.db.read(sync_state)).last_pull_at is None:
        raise ApiError(503, "the box has no copy of the store's catalog yet (it syncs once paired and online)")
    raise ApiError(404, f"no {label} for sku {sku!r}")


class CatalogReads:
    """A front handler of the store API (:class:`WebParts` ``front``): a ``GET`` of one
    product, price or stock record is answered by :func:`read_one` here, before Starlette's
    error and CORS middleware, its router and endpoint wrapper (docs/store-api.md, "Speed").
    A request with an ``Origin`` (a browser's: it needs the CORS headers) takes the app's
    way, whose routes call the same :func:`read_one`, so both ways give the same answers."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> bool:
        if scope["type"] != "http" or scope["method"] != "GET":
            return False
        path: str = scope["path"]
        slash = path.find("/", 4)  # "/v1/<entity>/..."
        read = READS.get(path[:slash + 1]) if slash > 0 else None
        if read is None or len(path) <= slash + 1 or from_browser(scope):
            return False
        await answer_in_front(scope, receive, send, partial(read_one, self.runtime, entity=read[0], label=read[1],
                                                            sku=path[slash + 1:]))
        return True


async def _answer(runtime: Runtime, kind: str, record_id: str, body: str,
                  received_at: float) -> SaleAnswer | OrderAnswer:
    event_id = event_id_of(kind, record_id)
    upload = msgspec.convert(await runtime.db.read(partial(upload_state, event_id=event_id)), Upload)
    if kind == "sale":
        return SaleAnswer(sale=msgspec.json.decode(body, type=Sale), received_at=rfc3339(received_at), upload=upload)
    return OrderAnswer(order=msgspec.json.decode(body, type=Order), received_at=rfc3339(received_at), upload=upload)


def api_parts() -> WebParts:
    return WebParts(routes=(routes,), front=(CatalogReads,))
