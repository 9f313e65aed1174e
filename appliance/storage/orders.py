"""Online orders (Service Bus) and the device commands they caused.

:func:`record_order` runs inside the caller's transaction (``runtime.db.write``): the
order, keyed by the message's ``message_id``, its device commands (through the device
outbox's :func:`~appliance.storage.outbox.enqueue_in`, with ids derived from the message
id and the device) and its "received" event for the platform, all or nothing. The same
message again finds its row and writes nothing (``created=False``). The caller notifies
``runtime.outbox_changes`` and ``runtime.uplink_changes`` after the commit, and only then
completes the message.

Reads for the store API list online orders next to the orders devices posted
(``device_orders``, the store API's table), newest first.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs

from appliance.protocol.events import RecordKind, order_received
from appliance.protocol.orders import OnlineOrder, canonical_json, choose_routing, command_id, event_id, targets
from appliance.storage.catalog import get_item
from appliance.storage.devices import list_adopted
from appliance.storage.event_log import append as log_event
from appliance.storage.events import enqueue as enqueue_event
from appliance.storage.outbox import Enqueued, enqueue_in

__all__ = ["LIST_MAX", "RETENTION_S", "Recorded", "get_order", "list_orders", "order_counts", "order_targets",
           "prune_orders", "record_order", "route_device_order"]

# The most orders one listing returns (GET /v1/orders?limit=).
LIST_MAX: Final = 200
# Orders are remembered this long, which must exceed how long Service Bus may deliver a
# message again (its time-to-live: 14 days by default on a standard namespace).
RETENTION_S: Final = 30 * 86400.0


@attrs.frozen(kw_only=True)
class Recorded:
    created: bool  # False: the message was taken before (a redelivery)
    commands: tuple[Enqueued, ...] = ()


def order_targets(conn: sqlite3.Connection, kind: str, configured: Mapping[str, Sequence[str]], *,
                  exclude: str = "") -> list[str]:
    """The adopted devices that receive a command of ``kind``: routing from the store's
    configuration (synced), else ``[orders] routing``, else the built-in default."""
    devices = [(d.id, d.kind) for d in list_adopted(conn) if d.id != exclude]
    store_config = get_item(conn, "store_config", "store")
    routing, _source = choose_routing(None if store_config is None else store_config.get("routing"), configured)
    return targets(kind, devices, routing)


def route_device_order(conn: sqlite3.Connection, *, order_id: str, order: Mapping[str, Any], from_device: str,
                       configured: Mapping[str, Sequence[str]], now: float) -> list[Enqueued]:
    """Send an order taken on a device (a kiosk, a POS) to the devices that prepare or
    print orders, in the caller's transaction; the device it came from is left out.
    Command ids derive from the order id, so writing the same order twice sends nothing more."""
    body = {"order": dict(order), "source": "device", "device_id": from_device}
    return [enqueue_in(conn, device_id, "order.created", body, command_id=command_id(order_id, device_id, source="dev"),
                       now=now)
            for device_id in order_targets(conn, "order.created", configured, exclude=from_device)]


def record_order(
    conn: sqlite3.Connection,
    *,
    message_id: str,
    order: OnlineOrder,
    device_ids: Sequence[str],
    at: str,
    now: float,
    delivery_count: int = 0,
) -> Recorded:
    """Store the order and enqueue its command to each of ``device_ids``, or do nothing if
    ``message_id`` was taken before. ``at`` is the RFC 3339 time for the platform event."""
    if conn.execute("SELECT 1 FROM online_orders WHERE message_id = ?", (message_id,)).fetchone():
        return Recorded(created=False)
    conn.execute(
        "INSERT INTO online_orders (message_id, order_id, kind, body, received_at, delivery_count) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (message_id, order.order_id, order.kind, canonical_json(order.as_dict()), now, delivery_count),
    )
    body = {"order": order.as_dict(), "source": "online", "message_id": message_id}
    made = []
    for device_id in device_ids:
        cid = command_id(message_id, device_id)
        made.append(enqueue_in(conn, device_id, order.kind, body, command_id=cid, now=now))
        conn.execute("INSERT INTO online_order_commands (message_id, command_id, device_id, kind) "
                     "VALUES (?, ?, ?, ?)", (message_id, cid, device_id, order.kind))
    log_event(conn, "order.received", {"id": order.order_id, "source": "online", "kind": order.kind,
                                       "message_id": message_id, "devices": list(device_ids),
                                       "order": order.as_dict()}, now=now, subject=order.order_id, optional="order")
    if order.kind == "order.created":
        eid = event_id(order.order_id)
        event = order_received(id=eid, order_id=order.order_id, at=at, source="online")
        enqueue_event(conn, id=eid, kind=RecordKind.ORDER, body=canonical_json(event), now=now)
    return Recorded(created=True, commands=tuple(made))


def _online(conn: sqlite3.Connection, row: sqlite3.Row) -> dict[str, Any]:
    commands = conn.execute(
        "SELECT c.command_id, c.device_id, c.kind, o.state, o.reason FROM online_order_commands c "
        "LEFT JOIN outbox o ON o.id = c.command_id WHERE c.message_id = ? ORDER BY c.device_id",
        (row["message_id"],)).fetchall()
    return {"source": "online", "id": row["order_id"], "message_id": row["message_id"], "kind": row["kind"],
            "order": json.loads(row["body"]), "received_at": row["received_at"],
            "delivery_count": row["delivery_count"],
            # A command already pruned from the outbox (acked long ago) shows as "pruned".
            "commands": [{"id": c["command_id"], "device_id": c["device_id"], "kind": c["kind"],
                          "state": c["state"] or "pruned", "reason": c["reason"] or ""} for c in commands]}


def get_order(conn: sqlite3.Connection, order_id: str) -> dict[str, Any] | None:
    """The online order with this message id or order id (the latest such), or None."""
    row = conn.execute(
        "SELECT * FROM online_orders WHERE message_id = ? OR order_id = ? ORDER BY received_at DESC LIMIT 1",
        (order_id, order_id)).fetchone()
    return None if row is None else _online(conn, row)


def list_orders(conn: sqlite3.Connection, *, limit: int, source: str = "") -> list[dict[str, Any]]:
    """The newest orders, online (Service Bus) and from devices (the store API), merged by
    time. ``source`` = ``online`` or ``device`` keeps one kind only."""
    limit = max(1, min(limit, LIST_MAX))
    out: list[dict[str, Any]] = []
    if source in ("", "online"):
        rows = conn.execute("SELECT * FROM online_orders ORDER BY received_at DESC LIMIT ?", (limit,)).fetchall()
        out.extend(_online(conn, r) for r in rows)
    if source in ("", "device"):
        rows = conn.execute("SELECT id, device_id, body, received_at FROM device_orders "
                            "ORDER BY received_at DESC LIMIT ?", (limit,)).fetchall()
        out.extend({"source": "device", "id": r["id"], "device_id": r["device_id"], "order": json.loads(r["body"]),
                    "received_at": r["received_at"]} for r in rows)
    out.sort(key=lambda o: (-o["received_at"], o["id"]))
    return out[:limit]


def order_counts(conn: sqlite3.Connection) -> dict[str, int]:
    online = conn.execute("SELECT count(*) FROM online_orders").fetchone()[0]
    commands = conn.execute("SELECT count(*) FROM online_order_commands").fetchone()[0]
    return {"online_orders": online, "online_order_commands": commands}


def prune_orders(conn: sqlite3.Connection, *, before: float) -> int:
    """Forget online orders received before ``before`` (their commands' links go too)."""
    return conn.execute("DELETE FROM online_orders WHERE received_at < ?", (before,)).rowcount
