"""The store API's bodies (port 8000): what devices post and what the box answers, sans-I/O.

Each request and response body is one :class:`~appliance.protocol.bodies.Body`: the
validation, the JSON encoding and the JSON Schema served in ``GET /v1/openapi.json``
(docs/store-api.md) all come from it. Posted bodies are checked strictly (no ``"2"`` for
2, no ``true`` for 1, no lone surrogates in strings), unknown fields refused, and every
problem reported with its path (``lines[0].qty: must not be 0``). The rules are at least
as strict as the platform's event rules (docs/cloud-contract.md), so a sale the box
accepts is a sale the platform accepts: errors reach the device that can fix them, not a
rejection hours later.

Exceptions: :class:`InvalidRecord` (``errors``: one path-named line per problem).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Annotated, Any, Final, Literal

import msgspec

from appliance.protocol.bodies import Body, Count, InvalidBody, Matches, Range, Text, convert
from appliance.protocol.channel_codec import MAX_BODY_BYTES, MAX_ID_CHARS, MAX_KIND_CHARS
from appliance.protocol.events import EVENT_TYPE_OF, RecordKind, event, order_received, record_event_id

__all__ = [
    "BATCH_MAX",
    "BODIES",
    "CLIENT_ID_MAX",
    "LINES_MAX",
    "RECORD_MAX_BYTES",
    "BatchAnswer",
    "BatchCommand",
    "BatchQueued",
    "CommandAnswer",
    "CommandBatch",
    "CommandList",
    "CommandRecord",
    "CommandRequest",
    "CommandView",
    "Error",
    "InvalidRecord",
    "ListedOrder",
    "OnlineOrderList",
    "Order",
    "OrderAnswer",
    "OrderLine",
    "Payment",
    "Price",
    "Product",
    "ProductPage",
    "Sale",
    "SaleAnswer",
    "SaleLine",
    "Stock",
    "Upload",
    "canonical",
    "canonical_json",
    "event_id_of",
    "event_of",
    "parse_order",
    "parse_sale",
]

# Ids: the platform's event-id alphabet; the box prefixes "sale-"/"order-", so the
# device's own id leaves room for it within the platform's 128 characters.
CLIENT_ID_MAX: Final = 120
TEXT_MAX: Final = 128  # the platform's bound on a string field
NOTE_MAX: Final = 1000
LINES_MAX: Final = 500  # the platform's bound on sale lines
# The largest sale or order body taken: 500 lines of a few fields of at most 128 characters
# fit in far less; anything bigger is refused (413) before it is read.
RECORD_MAX_BYTES: Final = 512 * 1024
# Beyond these, a number is a bug on the device (a price in cents above 10 million euros).
QTY_MAX: Final = 1_000_000
BATCH_MAX: Final = 500  # commands in one POST /v1/commands
CENTS_MAX: Final = 10**12
_RFC3339: Final = (r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])[Tt]([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)(\.\d{1,9})?"
                   r"([Zz]|[+-]([01]\d|2[0-3]):[0-5]\d)")


class InvalidRecord(InvalidBody):
    """A posted body is not a valid record; ``errors`` has one path-named line per problem."""


ClientId = Annotated[str, Matches(r"[A-Za-z0-9._:-]+", max_chars=CLIENT_ID_MAX,
                                  rule=f"1 to {CLIENT_ID_MAX} characters of A-Z a-z 0-9 . _ : -",
                                  template="{rule} (got {value!r:.40})")]
Name = Annotated[str, Text(TEXT_MAX)]
Currency = Annotated[str, Matches(r"[A-Z]{3}", rule="must be 3 capital letters (ISO 4217, e.g. EUR)",
                                  template="{rule}, got {value!r:.20}")]
# Absent: the box stamps the time it received the record.
Timestamp = Annotated[str, Matches(_RFC3339, empty=True, template="{rule}, got {value!r:.40}",
                                   rule="must be an RFC 3339 time with an offset (2025-03-01T09:30:00Z)")]


def _check_total(total_cents: int, lines: Sequence[SaleLine | OrderLine]) -> Iterable[str]:
    """The total is the sum of the lines (qty x unit price): a till that sends another
    figure has a bug, and the platform would book the wrong amount."""
    expected = sum(line.qty * line.unit_price_cents for line in lines)
    if total_cents != expected:
        yield f"total_cents: must be the sum of the lines (qty x unit_price_cents), {expected}; got {total_cents}"


class SaleLine(Body, frozen=True):
    """One line of a sale; a negative ``qty`` is a return."""

    sku: Name
    qty: Annotated[int, Range(-QTY_MAX, QTY_MAX, nonzero=True)]
    unit_price_cents: Annotated[int, Range(0, CENTS_MAX)]


class Payment(Body, frozen=True):
    """How (part of) a sale was paid."""

    method: Name
    amount_cents: Annotated[int, Range(-CENTS_MAX, CENTS_MAX)]


class Sale(Body, frozen=True):
    """A sale made on a device (a till): goes up as the platform event ``sale``."""

    id: ClientId
    device_id: Name
    currency: Currency
    total_cents: Annotated[int, Range(-CENTS_MAX, CENTS_MAX)]
    lines: Annotated[tuple[SaleLine, ...], Count(1, LINES_MAX)]
    payments: Annotated[tuple[Payment, ...], Count(0, LINES_MAX)] = ()
    at: Timestamp = ""

    def check(self) -> Iterable[str]:
        return _check_total(self.total_cents, self.lines)


class OrderLine(Body, frozen=True, omit_defaults=False):
    """One line of an order (``name``: what the kitchen screen shows; always sent, as it
    always was, so stored records compare equal across versions)."""

    sku: Name
    qty: Annotated[int, Range(1, QTY_MAX)]
    unit_price_cents: Annotated[int, Range(0, CENTS_MAX)]
    name: Annotated[str, Text(TEXT_MAX, empty=True)] = ""


class Order(Body, frozen=True):
    """An order taken on a device (a kiosk, a POS): goes up as ``order.status`` "received"."""

    id: ClientId
    device_id: Name
    currency: Currency
    total_cents: Annotated[int, Range(0, CENTS_MAX)]
    lines: Annotated[tuple[OrderLine, ...], Count(1, LINES_MAX)]
    note: Annotated[str, Text(NOTE_MAX, empty=True, multiline=True)] = ""
    at: Timestamp = ""

    def check(self) -> Iterable[str]:
        return _check_total(self.total_cents, self.lines)


# --- answers -----------------------------------------------------------------------------------


class Error(Body, frozen=True):
    """Every error: a sentence, and for a bad request one ``path: problem`` line each."""

    error: str
    errors: tuple[str, ...] = ()


class Upload(Body, frozen=True):
    """Where the record's platform event stands (``reason``: why the platform refused it)."""

    event_id: str
    state: Literal["queued", "sent", "accepted", "rejected"]
    reason: str | None = None


class SaleAnswer(Body, frozen=True):
    """A stored sale, when the box received it, and its upload."""

    sale: Sale
    received_at: str
    upload: Upload


class OrderAnswer(Body, frozen=True):
    """A stored device order, when the box received it, and its upload."""

    order: Order
    received_at: str
    upload: Upload


class Product(Body, frozen=True, forbid_unknown_fields=False):
    """A product as the platform sent it (docs/cloud-contract.md); fields the platform adds
    later are passed on as they are."""

    sku: str
    name: str = ""
    category: str | None = None
    tax_rate_bp: int | None = None
    barcode: str | None = None
    image: str | None = None
    active: bool = True


class Price(Body, frozen=True, forbid_unknown_fields=False):
    """A product's price as the platform sent it."""

    sku: str
    amount_cents: int | None = None
    currency: str | None = None


class Stock(Body, frozen=True, forbid_unknown_fields=False):
    """A product's stock as the platform sent it (may be negative after oversales)."""

    sku: str
    qty: int | None = None


class ProductPage(Body, frozen=True):
    """One page of a product search; ``next`` is the ``after`` of the next page (null: the last)."""

    items: tuple[Product, ...]
    next: str | None


class ListedOrder(Body, frozen=True, forbid_unknown_fields=False):
    """An order as the box keeps it: online (Service Bus: the message, its devices' commands)
    or from a device (``order``: the posted order)."""

    source: Literal["online", "device"]
    id: str
    received_at: str


class OnlineOrderList(Body, frozen=True):
    """The newest orders, online and from devices, newest first."""

    orders: tuple[ListedOrder, ...]


# The device channel's own rules for a command (appliance/protocol/channel_codec.py:
# check_kind, check_command_id, encode_body), stated for the document; the command routes
# check them with the channel's functions (tests/test_openapi.py holds the two together).
CommandKind = Annotated[str, Matches(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)*", max_chars=MAX_KIND_CHARS,
                                     rule="a dotted lower-case name (e.g. order.created, print, display, ping)")]
CommandId = Annotated[str | None, Matches(rf"[A-Za-z0-9._:-]{{1,{MAX_ID_CHARS}}}",
                                          rule="a client-made id: A-Z a-z 0-9 . _ : -")]
CommandBody = Annotated[dict[str, Any], msgspec.Meta(
    description=f"the command's own fields, a JSON object of at most {MAX_BODY_BYTES} bytes encoded")]
ExpiresAt = Annotated[float | None, msgspec.Meta(description="Unix seconds, in the future; null: never")]


class CommandRequest(Body, frozen=True):
    """A command for a device (docs/device-channel.md). ``id``: a client-made id, so a
    retried request adds no second command; ``expires_at``: Unix seconds."""

    kind: CommandKind
    body: CommandBody
    expires_at: ExpiresAt = None
    id: CommandId = None


class BatchCommand(Body, frozen=True):
    """A command of a batch: a :class:`CommandRequest` with the device it is for."""

    device_id: Annotated[str, msgspec.Meta(min_length=1)]
    kind: CommandKind
    body: CommandBody
    expires_at: ExpiresAt = None
    id: CommandId = None


class CommandBatch(Body, frozen=True):
    """Commands queued in one transaction, all or none."""

    commands: Annotated[tuple[BatchCommand, ...], Count(1, BATCH_MAX)]


class BatchQueued(Body, frozen=True):
    """One command of a batch as queued."""

    id: str
    device_id: str
    seq: int
    created: bool


class BatchAnswer(Body, frozen=True):
    """The batch's commands, in the request's order."""

    commands: tuple[BatchQueued, ...]


class CommandAnswer(Body, frozen=True):
    """The queued command (``created``: false when ``id`` named one already queued)."""

    id: str
    device_id: str
    seq: int
    state: str
    created: bool


class CommandRecord(Body, frozen=True):
    """A command and where its delivery stands."""

    id: str
    device_id: str
    seq: int
    kind: str
    body: dict[str, Any]
    expires_at: float | None
    state: Literal["queued", "sent", "acked", "dead"]
    reason: str | None
    attempts: int
    created_at: float
    sent_at: float | None
    settled_at: float | None


class CommandList(Body, frozen=True):
    """A device's commands, newest first."""

    device_id: str
    commands: tuple[CommandRecord, ...]


class CommandView(Body, frozen=True):
    """One command."""

    command: CommandRecord


# Every body of the store API, for its document.
BODIES: Final = (Sale, Order, SaleAnswer, OrderAnswer, Error, Product, Price, Stock, ProductPage, OnlineOrderList,
                 CommandRequest, CommandAnswer, CommandList, CommandView, ListedOrder, CommandBatch, BatchAnswer)


def _parse(value: Any, kind: type[Sale] | type[Order]) -> Any:
    try:
        return convert(value, kind)
    except InvalidBody as exc:
        raise InvalidRecord(exc.errors) from None


def parse_sale(value: Any) -> Sale:
    """A sale from its decoded JSON, or :class:`InvalidRecord`."""
    sale: Sale = _parse(value, Sale)
    return sale


def parse_order(value: Any) -> Order:
    """An order from its decoded JSON, or :class:`InvalidRecord`."""
    order: Order = _parse(value, Order)
    return order


def canonical(record: Sale | Order) -> dict[str, Any]:
    """The record as plain data (what is stored and compared for idempotency); optional
    fields left empty are left out, so sending them empty or not at all is the same."""
    data: dict[str, Any] = json.loads(msgspec.json.encode(record))
    return data


def event_id_of(kind: str, record_id: str) -> str:
    """The platform event id of a device's sale or order (``sale-<id>``, ``order-<id>``)."""
    return record_event_id(kind, record_id)


def event_of(record: Sale | Order, *, received_at: str) -> dict[str, Any]:
    """The platform event for a device's record (docs/cloud-contract.md, "Events up")."""
    at = record.at or received_at
    body = canonical(record)
    del body["id"]
    body.pop("at", None)
    if isinstance(record, Sale):
        return event(id=event_id_of(RecordKind.SALE, record.id), type=EVENT_TYPE_OF[RecordKind.SALE], at=at, data=body)
    # The contract has no event for an order taken on a device: it goes up as its first
    # status, "received", carrying the order itself (the platform keeps unknown fields).
    return order_received(id=event_id_of(RecordKind.ORDER, record.id), order_id=record.id, at=at, **body)


def canonical_json(value: Any) -> str:
    """Compact JSON with sorted keys: equal records give equal text (the idempotency test).
    Validated records hold no lone surrogates, so the text is always valid UTF-8."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
