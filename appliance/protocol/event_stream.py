"""The local event stream on port 8001: topics, types, subscriptions and the wire format.

Sans-I/O: what a subscriber asked for, what its credential lets it see, which events it
gets, and the exact text of every message, for both the WebSocket (``/v1/events``) and
Server-Sent Events (``GET /v1/events``). The services around it only move the text.

An event message is one JSON object::

    {"id": 42, "type": "price.changed", "topic": "catalog", "at": "2026-11-29T18:00:00.000Z",
     "data": {"sku": "A-1", "price": {...}}}

Control messages carry a ``type`` and no ``id`` (``subscribed``, ``ping``, ``resync``,
``slow``, ``closing``, ``error``); docs/events.md lists every one with an example.

Errors: :class:`SubscriptionError` (a bad request: 400), :class:`Forbidden` (the
credential may not read what was asked: 403). Both carry a message for a person.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from typing import Any, Final

import attrs

from appliance.protocol.events import RecordKind

__all__ = [
    "BODY_MAX_BYTES",
    "EVENT_TYPES",
    "REBUILD",
    "RECEIVED_TYPE",
    "Forbidden",
    "Grant",
    "StoredEvent",
    "Subscription",
    "SubscriptionError",
    "Topic",
    "closing_message",
    "coalesced",
    "encode_event",
    "error_message",
    "ping_message",
    "resync_message",
    "slow_message",
    "small_body",
    "sse_comment",
    "sse_frame",
    "subscribed_message",
    "topic_of",
]


class Topic(enum.StrEnum):
    CATALOG = "catalog"  # products, prices, stock, store configuration from the platform
    ORDERS = "orders"  # orders and sales received (online and from the shop's devices)
    COMMANDS = "commands"  # commands to one device: queued, acked, dead (device-scoped)
    DEVICES = "devices"  # the device registry and each device's link
    SYNC = "sync"  # pulls from the platform, snapshots, pairing
    MEDIA = "media"  # the media manifest and the media cache


# Every event type and its topic: the one list (docs/events.md shows each with an example).
EVENT_TYPES: Final[Mapping[str, Topic]] = {
    "product.changed": Topic.CATALOG,
    "product.deleted": Topic.CATALOG,
    "price.changed": Topic.CATALOG,
    "price.deleted": Topic.CATALOG,
    "stock.changed": Topic.CATALOG,
    "stock.deleted": Topic.CATALOG,
    "store_config.changed": Topic.CATALOG,
    "store_config.deleted": Topic.CATALOG,
    "catalog.replaced": Topic.CATALOG,
    "order.received": Topic.ORDERS,
    "sale.received": Topic.ORDERS,
    "command.queued": Topic.COMMANDS,
    "command.acked": Topic.COMMANDS,
    "command.dead": Topic.COMMANDS,
    "device.discovered": Topic.DEVICES,
    "device.adopted": Topic.DEVICES,
    "device.rejected": Topic.DEVICES,
    "device.pending": Topic.DEVICES,
    "device.removed": Topic.DEVICES,
    "device.link_up": Topic.DEVICES,
    "device.link_down": Topic.DEVICES,
    "store_device.changed": Topic.DEVICES,
    "store_device.deleted": Topic.DEVICES,
    "sync.pulled": Topic.SYNC,
    "sync.snapshot": Topic.SYNC,
    "pairing.changed": Topic.SYNC,
    "media.changed": Topic.MEDIA,
    "media.deleted": Topic.MEDIA,
    "media.cached": Topic.MEDIA,
}

# The event a device's record (a vocabulary of ``protocol.events``) is announced as.
RECEIVED_TYPE: Final[Mapping[RecordKind, str]] = {RecordKind.SALE: "sale.received", RecordKind.ORDER: "order.received"}

# What a client calls to rebuild a topic's state after a ``resync`` (the events it missed
# are gone from the log). Ports are the box's port map: 8000 store API, 80 admin.
REBUILD: Final[Mapping[Topic, str]] = {
    Topic.CATALOG: "GET :8000/v1/products?prefix=<sku prefix> (paged with after=), then "
                   "GET :8000/v1/prices/{sku} and GET :8000/v1/stock/{sku}",
    Topic.ORDERS: "GET :8000/v1/orders",
    Topic.COMMANDS: "GET :8000/v1/devices/{device_id}/commands",
    Topic.DEVICES: "GET :80/api/devices",
    Topic.SYNC: "GET :80/api/status",
    Topic.MEDIA: "GET :80/api/status",
}

# An event's body is small: the ids a client needs and small values. Anything bigger is
# left out (``"truncated": true``) and read from the store API instead.
BODY_MAX_BYTES: Final = 2048
# A filter value (device id, SKU prefix) longer than this is not an id.
_FILTER_MAX_CHARS: Final = 200
_TOPIC_LIST_MAX_CHARS: Final = 200
_ID_MAX: Final = 2**63 - 1
_DIGITS: Final = re.compile(r"[0-9]{1,19}")


class SubscriptionError(ValueError):
    """The subscription request cannot be understood (answered 400)."""


class Forbidden(Exception):
    """The credential may not read what the subscription asks for (answered 403)."""


def topic_of(event_type: str) -> Topic:
    """The topic of ``event_type``; KeyError for a type that is not in :data:`EVENT_TYPES`."""
    return EVENT_TYPES[event_type]


def small_body(data: Mapping[str, Any], *, optional: str = "") -> str:
    """``data`` as compact JSON; if over :data:`BODY_MAX_BYTES`, without its ``optional``
    key and marked ``"truncated": true`` (the ids stay, the client reads the rest)."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    if len(text.encode()) <= BODY_MAX_BYTES or not optional:
        return text
    rest = {k: v for k, v in data.items() if k != optional}
    rest["truncated"] = True
    return json.dumps(rest, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


@attrs.frozen(kw_only=True)
class Grant:
    """What a credential may read: everything (the admin), or one device's view."""

    admin: bool
    device_id: str = ""
    who: str = ""  # for logs: "admin" or "device <id>"


@attrs.frozen(kw_only=True)
class Subscription:
    topics: frozenset[Topic]
    device: str = ""  # only this device's events (and store-wide ones); "" = every device
    sku_prefix: str = ""  # catalog events only for SKUs starting with this
    after: int | None = None  # the last id the client saw; None = live events only
    # WebSocket only: several events pending may go as one message, a JSON array of events
    # (as Home Assistant's coalesce_messages); without it, every event is its own message.
    coalesce: bool = False

    @classmethod
    def parse(cls, params: Mapping[str, str], *, last_event_id: str | None = None) -> Subscription:
        """From the query string (``topics``, ``device``, ``sku_prefix``, ``after``). An SSE
        client's ``Last-Event-ID`` header wins over ``after``: ``EventSource`` reconnects
        to the same URL and says in that header how far it got since."""
        unknown = sorted(set(params) - {"topics", "device", "sku_prefix", "after", "coalesce", "token"})
        if unknown:
            raise SubscriptionError(f"unknown parameter(s) {', '.join(unknown)}; "
                                    "expected topics, device, sku_prefix, after, coalesce")
        coalesce = params.get("coalesce", "0")
        if coalesce not in ("0", "1"):
            raise SubscriptionError(f"coalesce: expected 0 or 1, got {coalesce[:20]!r}")
        raw_topics = params.get("topics", "")
        if len(raw_topics) > _TOPIC_LIST_MAX_CHARS:
            raise SubscriptionError("topics: too long")
        names = [t.strip() for t in raw_topics.split(",") if t.strip()]
        known = {t.value for t in Topic}
        bad = [n for n in names if n not in known]
        if bad:
            raise SubscriptionError(f"topics: unknown topic(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
        topics = frozenset(Topic(n) for n in names) if names else frozenset(Topic)
        device = params.get("device", "")
        sku_prefix = params.get("sku_prefix", "")
        for name, value in (("device", device), ("sku_prefix", sku_prefix)):
            if len(value) > _FILTER_MAX_CHARS or any(ord(c) < 32 for c in value):
                raise SubscriptionError(f"{name}: not a valid value")
        raw_after = params.get("after")
        if last_event_id:
            raw_after = last_event_id.strip()
        after: int | None = None
        if raw_after is not None:
            if not _DIGITS.fullmatch(raw_after) or int(raw_after) > _ID_MAX:
                raise SubscriptionError(f"after: expected the id of the last event seen (a whole number), "
                                        f"got {raw_after[:40]!r}")
            after = int(raw_after)
        return cls(topics=topics, device=device, sku_prefix=sku_prefix, after=after, coalesce=coalesce == "1")

    def limited_to(self, grant: Grant) -> Subscription:
        """This subscription as ``grant`` may have it: a device sees its own device's
        events (and store-wide ones) only. Raises :class:`Forbidden` if it asked for
        another device's."""
        if grant.admin:
            return self
        if self.device and self.device != grant.device_id:
            raise Forbidden(f"device {grant.device_id!r} may not subscribe to the events of device {self.device!r}")
        return attrs.evolve(self, device=grant.device_id)

    def matches(self, *, topic: str, device_id: str, subject: str) -> bool:
        if topic not in self.topics:
            return False
        if self.device and device_id and device_id != self.device:
            return False
        # A SKU prefix narrows catalog events only; events without a SKU always pass.
        return not (self.sku_prefix and topic == Topic.CATALOG and subject
                    and not subject.startswith(self.sku_prefix))


@attrs.frozen(kw_only=True, slots=True)
class StoredEvent:
    """One row of the event log, with its message text made once for every subscriber."""

    id: int
    topic: str
    type: str
    device_id: str
    subject: str
    at: float
    text: str  # the whole message, as sent
    loaded_at: float = 0.0  # when the box read it after its commit (its monotonic clock); 0: read back later


def encode_event(*, id: int, type: str, topic: str, at_text: str, body: str) -> str:
    """The message for one event; ``body`` is already compact JSON (stored that way)."""
    return (f'{{"id":{id},"type":{json.dumps(type)},"topic":{json.dumps(topic)},'
            f'"at":{json.dumps(at_text)},"data":{body}}}')


# A coalesced message holds at most this many events (a few hundred KiB at most).
COALESCE_MAX: Final = 256


def coalesced(texts: list[str]) -> list[str]:
    """Event messages packed into JSON arrays of at most :data:`COALESCE_MAX` events."""
    return ["[" + ",".join(texts[i:i + COALESCE_MAX]) + "]" for i in range(0, len(texts), COALESCE_MAX)]


def _control(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, **fields}, separators=(",", ":"))


def subscribed_message(sub: Subscription, *, head: int, oldest: int) -> str:
    return _control("subscribed", topics=sorted(sub.topics), device=sub.device, sku_prefix=sub.sku_prefix,
                    after=sub.after, head=head, oldest=oldest)


def resync_message(sub: Subscription, *, head: int, oldest: int) -> str:
    """The client's id is older than what the log keeps (or newer than anything the box
    wrote): its state must be rebuilt from the store API, then followed from ``head``."""
    rebuild = {str(t): REBUILD[t] for t in sorted(sub.topics)}
    return _control("resync", after=sub.after, oldest=oldest, head=head, rebuild=rebuild,
                    message=(f"events after id {sub.after} are no longer kept (the log starts at {oldest}); "
                             f"rebuild your state with the calls in 'rebuild', then follow from id {head}, "
                             "which this stream now does"))


def slow_message(*, resume_after: int, reason: str) -> str:
    return _control("slow", resume_after=resume_after,
                    message=f"{reason}; reconnect with after={resume_after} to get everything since")


def closing_message(*, resume_after: int) -> str:
    return _control("closing", resume_after=resume_after,
                    message=f"the box is stopping; reconnect with after={resume_after} once it is back")


def ping_message(*, head: int) -> str:
    return _control("ping", head=head)


def error_message(status: int, error: str) -> str:
    return _control("error", status=status, error=error)


def sse_frame(text: str, *, event: str, id: int | None = None) -> bytes:
    """One Server-Sent Events frame (``text`` is one line of JSON, so one ``data:``)."""
    head = f"id: {id}\n" if id is not None else ""
    return f"{head}event: {event}\ndata: {text}\n\n".encode()


def sse_comment(text: str) -> bytes:
    return f": {text}\n\n".encode()
