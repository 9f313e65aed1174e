"""The local event log behind port 8001 (not the upload outbox: that is ``events_outbox``).

:func:`append` runs inside the caller's transaction, next to the change it describes:
both are committed together or not at all, so after a crash the log and the tables
agree, and an id is never given twice (``AUTOINCREMENT`` keeps the highest id ever used
in ``sqlite_sequence``, in the same transaction).

Retention (:func:`prune`): at most ``max_rows`` rows and nothing older than ``max_age_s``
once a prune has run; the event-log service prunes every ``[events] prune_interval_s``
and whenever the log has grown past ``max_rows`` by a tenth, so the table never holds
more than ``max_rows * 1.1`` rows plus one write's worth.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from typing import Any

import attrs

from appliance.protocol.event_stream import small_body, topic_of

__all__ = ["LogBounds", "LogRow", "append", "append_if_changed", "bounds", "command_changed", "command_queued",
           "page_after", "prune", "read_after", "recent", "replica_changed"]


@attrs.frozen(kw_only=True, slots=True)
class LogRow:
    id: int
    topic: str
    type: str
    device_id: str
    subject: str
    at: float
    body: str


@attrs.frozen(kw_only=True)
class LogBounds:
    """``oldest``: the first id still kept (``head + 1`` when the log is empty);
    ``head``: the highest id ever written (0 for a new box)."""

    oldest: int
    head: int
    rows: int


def append(
    conn: sqlite3.Connection,
    type: str,
    data: Mapping[str, Any],
    *,
    now: float,
    device_id: str = "",
    subject: str = "",
    optional: str = "",
) -> int:
    """Log one event of ``type`` in the caller's transaction; returns its id. ``optional``
    names a key of ``data`` left out if the body would be too big (see ``small_body``)."""
    cur = conn.execute(
        "INSERT INTO event_log (topic, type, device_id, subject, at, body) VALUES (?, ?, ?, ?, ?, ?)",
        (str(topic_of(type)), type, device_id, subject, now, small_body(data, optional=optional)),
    )
    assert cur.lastrowid is not None
    return cur.lastrowid


_COLUMNS = "id, topic, type, device_id, subject, at, body"


def _rows(cur: sqlite3.Cursor) -> list[LogRow]:
    return [LogRow(id=r[0], topic=r[1], type=r[2], device_id=r[3], subject=r[4], at=r[5], body=r[6]) for r in cur]


def read_after(conn: sqlite3.Connection, after: int, limit: int) -> list[LogRow]:
    """Up to ``limit`` events with an id above ``after``, in id order."""
    return _rows(conn.execute(f"SELECT {_COLUMNS} FROM event_log WHERE id > ? ORDER BY id LIMIT ?", (after, limit)))


def page_after(conn: sqlite3.Connection, after: int, limit: int) -> tuple[list[LogRow], LogBounds]:
    """:func:`read_after` and :func:`bounds` from one snapshot (a reader's transaction)."""
    return read_after(conn, after, limit), bounds(conn)


def recent(conn: sqlite3.Connection, limit: int, topics: tuple[str, ...] = ()) -> list[LogRow]:
    """The newest ``limit`` events (of ``topics``, if given), newest first."""
    if topics:
        marks = ", ".join("?" * len(topics))
        cur = conn.execute(f"SELECT {_COLUMNS} FROM event_log WHERE topic IN ({marks}) ORDER BY id DESC LIMIT ?",
                           (*topics, limit))
    else:
        cur = conn.execute(f"SELECT {_COLUMNS} FROM event_log ORDER BY id DESC LIMIT ?", (limit,))
    return _rows(cur)


def bounds(conn: sqlite3.Connection) -> LogBounds:
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'event_log'").fetchone()
    head = int(row[0]) if row is not None else 0
    low, count = conn.execute("SELECT min(id), count(*) FROM event_log").fetchone()
    return LogBounds(oldest=int(low) if low is not None else head + 1, head=head, rows=int(count))


def prune(conn: sqlite3.Connection, *, max_rows: int, before: float) -> int:
    """Drop events beyond the newest ``max_rows`` and those logged before ``before``;
    returns how many. The highest id is remembered even if every row goes."""
    head = bounds(conn).head
    return conn.execute("DELETE FROM event_log WHERE id <= ? OR at < ?", (head - max_rows, before)).rowcount


# --- what the other storage modules log, next to their changes ----------------------

# Entity of the platform's changes feed -> the prefix of its event types.
_ENTITY_TYPE: dict[str, str] = {"product": "product", "price": "price", "stock": "stock",
                                "store_config": "store_config", "media": "media", "device": "store_device"}
# Entities keyed by SKU (their key is the subject a sku_prefix filter matches).
_BY_SKU = frozenset({"product", "price", "stock"})


def replica_changed(conn: sqlite3.Connection, *, entity: str, key: str, data: str | None, name: str,
                    now: float) -> None:
    """One row of the replica written (``data`` JSON text) or deleted (``data`` None)."""
    prefix = _ENTITY_TYPE.get(entity)
    if prefix is None:
        return
    id_key = "sku" if entity in _BY_SKU else "key"
    body: dict[str, Any] = {id_key: key}
    if data is None:
        append(conn, f"{prefix}.deleted", body, now=now, subject=key)
        return
    if entity == "product":
        body["name"] = name
    body[entity] = json.loads(data)
    append(conn, f"{prefix}.changed", body, now=now, subject=key, optional=entity)


def command_changed(conn: sqlite3.Connection, type: str, command_id: str, *, now: float) -> None:
    """A device command queued, acked or dead (read back from the outbox row)."""
    row = conn.execute(
        "SELECT device_id, seq, kind, reason, json_extract(body, '$.order.order_id') FROM outbox WHERE id = ?",
        (command_id,)).fetchone()
    if row is None:
        return
    _command_event(conn, type, command_id, device_id=row[0], seq=row[1], kind=row[2], order_id=row[4], now=now,
                   reason=row[3])


def command_queued(conn: sqlite3.Connection, command_id: str, *, device_id: str, seq: int, kind: str,
                   body: Mapping[str, Any], body_text: str, now: float) -> None:
    """``command.queued`` for a command just stored with these values (``body_text`` is
    ``body`` as stored), as :func:`command_changed` would log it, without reading the row
    back: one statement less in every enqueue's transaction, which its caller waits for
    (docs/architecture.md §7, "The way of one command"). The order id is SQLite's
    ``json_extract`` of the stored text, as there, asked only of a body with an ``order``."""
    order_id = None
    if "order" in body:
        order_id = conn.execute("SELECT json_extract(?, '$.order.order_id')", (body_text,)).fetchone()[0]
    _command_event(conn, "command.queued", command_id, device_id=device_id, seq=seq, kind=kind, order_id=order_id,
                   now=now)


def _command_event(conn: sqlite3.Connection, type: str, command_id: str, *, device_id: str, seq: int, kind: str,
                   order_id: Any, now: float, reason: str = "") -> None:
    body: dict[str, Any] = {"command_id": command_id, "device_id": device_id, "seq": seq, "kind": kind}
    if order_id is not None:
        body["order_id"] = order_id
    if type == "command.dead":
        body["reason"] = reason
    append(conn, type, body, now=now, device_id=device_id, subject=order_id or "")


def append_if_changed(conn: sqlite3.Connection, type: str, data: Mapping[str, Any], *, now: float) -> int | None:
    """Log ``data`` as ``type`` unless the last event of that type said the same (a state
    kept outside the database, such as the pairing file, logged when it changes)."""
    body = small_body(data)
    last = conn.execute("SELECT body FROM event_log WHERE type = ? ORDER BY id DESC LIMIT 1", (type,)).fetchone()
    if last is not None and last[0] == body:
        return None
    return append(conn, type, data, now=now)
