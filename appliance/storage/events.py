"""The events outbox to the platform, and the sales and orders the shop's devices post.

An event is ``queued`` when written, ``sent`` while it is in a batch on its way (the
batch's Idempotency-Key is kept with it, so a retry after a lost answer sends the very
same batch under the very same key, even after a restart), then ``accepted`` or
``rejected`` with the platform's reason. Rejected events are kept, never retried.

A device's sale or order is written together with its outbound event in the caller's
transaction: once the store API answers 201 both are on disk, and neither exists
without the other.
"""

from __future__ import annotations

import enum
import json
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import attrs

from appliance.protocol.event_stream import RECEIVED_TYPE
from appliance.protocol.events import RecordKind
from appliance.storage.event_log import append as log_event

__all__ = [
    "RECEIVED_TABLES",
    "Batch",
    "OutboxEvent",
    "OutboxStats",
    "Receipt",
    "Received",
    "claim_batch",
    "enqueue",
    "get_received",
    "outbox_stats",
    "prune_accepted",
    "receive",
    "recent_rejected",
    "reject_batch",
    "release_batch",
    "settle_batch",
    "upload_state",
]

# Kind of a device post -> the table that keeps it.
RECEIVED_TABLES: Final = {"sale": "device_sales", "order": "device_orders"}


@attrs.frozen(kw_only=True)
class OutboxEvent:
    seq: int
    id: str
    kind: str
    body: str  # JSON text
    attempts: int
    created_at: float


@attrs.frozen(kw_only=True)
class Batch:
    key: str  # the Idempotency-Key
    events: tuple[OutboxEvent, ...]
    resumed: bool  # already sent before (a retry), rather than formed just now


@attrs.frozen(kw_only=True)
class OutboxStats:
    queued: int  # not yet accepted or rejected (queued + sent)
    in_flight: int  # sent, answer not yet recorded
    accepted: int
    rejected: int
    oldest_unsent_at: float | None  # created_at of the oldest event not yet accepted/rejected


def enqueue(conn: sqlite3.Connection, *, id: str, kind: str, body: str, now: float) -> bool:
    """Queue one event; False if an event with this id is already in the outbox."""
    cur = conn.execute(
        "INSERT INTO events_outbox(id, kind, body, created_at) VALUES (?, ?, ?, ?) ON CONFLICT(id) DO NOTHING",
        (id, kind, body, now),
    )
    return cur.rowcount == 1


def _events(rows: Sequence[sqlite3.Row]) -> tuple[OutboxEvent, ...]:
    return tuple(OutboxEvent(seq=r["seq"], id=r["id"], kind=r["kind"], body=r["body"], attempts=r["attempts"],
                             created_at=r["created_at"]) for r in rows)


_COLUMNS: Final = "seq, id, kind, body, attempts, created_at"


def claim_batch(
    conn: sqlite3.Connection, *, limit: int, now: float, key_of: Callable[[Sequence[OutboxEvent]], str]
) -> Batch | None:
    """The batch to send next: the one already in flight if any (same events, same key),
    else up to ``limit`` queued events in order, marked sent under ``key_of(events)``."""
    row = conn.execute(
        "SELECT batch_key FROM events_outbox WHERE state = 'sent' ORDER BY seq LIMIT 1").fetchone()
    if row is not None:
        key = row[0]
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM events_outbox WHERE state = 'sent' AND batch_key = ? ORDER BY seq",
            (key,)).fetchall()
        conn.execute("UPDATE events_outbox SET attempts = attempts + 1, sent_at = ? WHERE batch_key = ? "
                     "AND state = 'sent'", (now, key))
        return Batch(key=key, events=_events(rows), resumed=True)
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM events_outbox WHERE state = 'queued' ORDER BY seq LIMIT ?", (limit,)).fetchall()
    if not rows:
        return None
    events = _events(rows)
    key = key_of(events)
    conn.executemany(
        "UPDATE events_outbox SET state = 'sent', batch_key = ?, attempts = attempts + 1, sent_at = ? WHERE seq = ?",
        [(key, now, e.seq) for e in events])
    return Batch(key=key, events=events, resumed=False)


def settle_batch(
    conn: sqlite3.Connection, *, key: str, accepted: Sequence[str], rejected: Mapping[str, str], now: float
) -> tuple[int, int, int]:
    """Record the platform's answer for batch ``key``. Events it did not mention go back
    to the queue (a new batch will carry them). Returns (accepted, rejected, requeued)."""
    n_acc = n_rej = 0
    for event_id in accepted:
        n_acc += conn.execute(
            "UPDATE events_outbox SET state = 'accepted', done_at = ?, reason = '' "
            "WHERE id = ? AND batch_key = ? AND state = 'sent'", (now, event_id, key)).rowcount
    for event_id, reason in rejected.items():
        n_rej += conn.execute(
            "UPDATE events_outbox SET state = 'rejected', done_at = ?, reason = ? "
            "WHERE id = ? AND batch_key = ? AND state = 'sent'", (now, reason, event_id, key)).rowcount
    requeued = release_batch(conn, key)
    return n_acc, n_rej, requeued


def release_batch(conn: sqlite3.Connection, key: str) -> int:
    """Put the events still in flight in batch ``key`` back in the queue (to split it)."""
    return conn.execute(
        "UPDATE events_outbox SET state = 'queued', batch_key = NULL WHERE batch_key = ? AND state = 'sent'",
        (key,)).rowcount


def reject_batch(conn: sqlite3.Connection, *, key: str, reason: str, now: float) -> int:
    """Mark every event still in flight in batch ``key`` rejected with ``reason``."""
    return conn.execute(
        "UPDATE events_outbox SET state = 'rejected', reason = ?, done_at = ? WHERE batch_key = ? AND state = 'sent'",
        (reason, now, key)).rowcount


def hold_unsent(conn: sqlite3.Connection, *, reason: str, now: float) -> int:
    """Take every event not yet accepted out of the upload queue, kept with ``reason``.

    Used when the box is paired with another store: those events belong to the store
    they were recorded for and must not be counted in the new store's books."""
    return conn.execute(
        "UPDATE events_outbox SET state = 'rejected', reason = ?, batch_key = NULL, done_at = ? "
        "WHERE state IN ('queued', 'sent')", (reason, now)).rowcount


def outbox_stats(conn: sqlite3.Connection) -> OutboxStats:
    counts = dict.fromkeys(("queued", "sent", "accepted", "rejected"), 0)
    for state, n in conn.execute("SELECT state, count(*) FROM events_outbox GROUP BY state"):
        counts[state] = n
    oldest = conn.execute(
        "SELECT min(created_at) FROM events_outbox WHERE state IN ('queued', 'sent')").fetchone()[0]
    return OutboxStats(queued=counts["queued"] + counts["sent"], in_flight=counts["sent"],
                       accepted=counts["accepted"], rejected=counts["rejected"], oldest_unsent_at=oldest)


def recent_rejected(conn: sqlite3.Connection, limit: int) -> list[dict[str, object]]:
    rows = conn.execute(
        "SELECT id, kind, reason, done_at FROM events_outbox WHERE state = 'rejected' ORDER BY done_at DESC, seq DESC "
        "LIMIT ?", (limit,)).fetchall()
    return [{"id": r[0], "kind": r[1], "reason": r[2], "at": r[3]} for r in rows]


def prune_accepted(conn: sqlite3.Connection, *, before: float) -> int:
    """Forget accepted events settled before ``before`` (the sales tables keep the records)."""
    return conn.execute(
        "DELETE FROM events_outbox WHERE state = 'accepted' AND done_at < ?", (before,)).rowcount


# --- what devices post ---------------------------------------------------------------


class Received(enum.Enum):
    CREATED = "created"  # new: stored, and its event queued
    SAME = "same"  # this id was posted before with this very body: nothing new
    CONFLICT = "conflict"  # this id was posted before with another body (or is another kind's)


@attrs.frozen(kw_only=True)
class Receipt:
    outcome: Received
    body: str  # the record as stored (for SAME and CONFLICT: the earlier one)
    received_at: float


def receive(
    conn: sqlite3.Connection, *, kind: str, id: str, device_id: str, body: str, event_id: str, event_body: str,
    now: float,
) -> Receipt:
    """Store a device's sale or order and queue its event, or recognise a repeat.

    ``body`` must be canonical JSON (sorted keys, no spaces) so "the same body" means the
    same record, not the same bytes. The event goes out as ``event_id``.
    """
    table = RECEIVED_TABLES[kind]
    row = conn.execute(f"SELECT body, received_at FROM {table} WHERE id = ?", (id,)).fetchone()
    if row is not None:
        outcome = Received.SAME if row[0] == body else Received.CONFLICT
        return Receipt(outcome=outcome, body=row[0], received_at=row[1])
    if not enqueue(conn, id=event_id, kind=kind, body=event_body, now=now):
        # The id is already taken by an event of another kind (a sale and an order
        # cannot share an id: the platform dedupes events on it).
        return Receipt(outcome=Received.CONFLICT, body="", received_at=now)
    conn.execute(f"INSERT INTO {table}(id, device_id, body, received_at) VALUES (?, ?, ?, ?)",
                 (id, device_id, body, now))
    data = {"id": id, "source": "device", "device_id": device_id, kind: json.loads(body)}
    log_event(conn, RECEIVED_TYPE[RecordKind(kind)], data, now=now, subject=id, optional=kind)
    return Receipt(outcome=Received.CREATED, body=body, received_at=now)


def get_received(conn: sqlite3.Connection, kind: str, id: str) -> Receipt | None:
    row = conn.execute(f"SELECT body, received_at FROM {RECEIVED_TABLES[kind]} WHERE id = ?", (id,)).fetchone()
    return None if row is None else Receipt(outcome=Received.SAME, body=row[0], received_at=row[1])


def upload_state(conn: sqlite3.Connection, event_id: str) -> dict[str, str]:
    """Where an event's upload stands: queued, sent, accepted or rejected (with the reason).
    An event no longer in the outbox was accepted and has since been dropped."""
    row = conn.execute("SELECT state, reason FROM events_outbox WHERE id = ?", (event_id,)).fetchone()
    if row is None:
        return {"event_id": event_id, "state": "accepted"}
    out = {"event_id": event_id, "state": row[0]}
    if row[0] == "rejected":
        out["reason"] = row[1]
    return out
