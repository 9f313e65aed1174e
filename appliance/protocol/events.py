"""The events the box sends up to the platform (docs/cloud-contract.md, "Events up"), sans-I/O.

Two vocabularies meet here, and this module is where one becomes the other:

- :class:`RecordKind`: what the box keeps locally and what a device posts to the store
  API (``sale``, ``order``); also the ``kind`` of a queued event in the outbox.
- :class:`EventType`: the platform's ``type`` of an uploaded event (``sale``,
  ``order.status``, ``device.status``), the only list of them in the tree.

The box's own stream to the shop's devices and browsers (port 8001) has a third
vocabulary, local state changes (``order.received``, ``device.link_up``, ...), listed in
``protocol.event_stream.EVENT_TYPES`` with their topics.

Every uploaded event is ``{id, type, at, data}`` and is built by :func:`event`; its id
is client-made and stable, so a retried upload is deduplicated by the platform.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, Final

__all__ = ["EVENT_TYPE_OF", "EventType", "RecordKind", "event", "online_order_event_id", "order_received",
           "record_event_id"]


class RecordKind(enum.StrEnum):
    SALE = "sale"
    ORDER = "order"


class EventType(enum.StrEnum):
    SALE = "sale"
    ORDER_STATUS = "order.status"
    DEVICE_STATUS = "device.status"


# The event a local record goes up as. The contract has no event for an order taken on a
# device: it goes up as its first status, "received", carrying the order itself.
EVENT_TYPE_OF: Final[Mapping[RecordKind, EventType]] = {
    RecordKind.SALE: EventType.SALE,
    RecordKind.ORDER: EventType.ORDER_STATUS,
}


def event(*, id: str, type: EventType, at: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """One event as uploaded: ``{id, type, at, data}``."""
    return {"id": id, "type": str(type), "at": at, "data": dict(data)}


def record_event_id(kind: str, record_id: str) -> str:
    """The event id of a device's sale or order (``sale-<id>``, ``order-<id>``)."""
    return f"{kind}-{record_id}"


def online_order_event_id(order_id: str) -> str:
    """The event id saying the shop received an online order."""
    return f"online:{order_id}:received"


def order_received(*, id: str, order_id: str, at: str, **data: Any) -> dict[str, Any]:
    """The ``order.status`` event "received" of an order (from a device or online)."""
    return event(id=id, type=EventType.ORDER_STATUS, at=at, data={"order_id": order_id, "status": "received", **data})
