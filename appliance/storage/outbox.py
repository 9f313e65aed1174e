"""The durable device outbox: commands from enqueue until the device acks them.

Every function takes a connection and runs inside the caller's transaction. To enqueue
from a service, write and then wake the dispatcher::

    enqueued = await runtime.db.write(partial(enqueue_in, device_id=..., kind=..., body=...))
    runtime.outbox_changes.notify()

(``appliance.services.dispatcher.enqueue`` does exactly that.) A caller that must write
something else atomically with the commands (the Service Bus order receiver: the order
and its device commands in one transaction) calls :func:`enqueue_in` from its own write
function, and notifies after ``db.write`` returns. Nothing is visible to the dispatcher
before the transaction commits, and a committed command is on disk (``synchronous=FULL``)
before anyone is told it was accepted.

``command_id`` makes an enqueue idempotent: the same id for the same device returns the
command already stored (``created=False``) instead of adding a second one.

States: queued -> sent -> acked | dead. A late ack wins over dead (the device has the
command); nothing moves a command back from acked or dead.

Errors::

    OutboxError          the command is not acceptable (bad kind, body, expiry or id);
     │                   the message says which and why
     └── CommandIdTaken  the client-made id is already used for another device
"""

from __future__ import annotations

import enum
import itertools
import json
import math
import sqlite3
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs

from appliance.protocol.channel import Acked, Dead, Record, Sent
from appliance.protocol.channel_codec import ChannelProtocolError, Command, check_command_id, check_kind, encode_body
from appliance.storage.event_log import command_changed, command_queued

__all__ = [
    "MAX_LIST",
    "Backlog",
    "CommandIdTaken",
    "CommandState",
    "Enqueued",
    "OutboxError",
    "OutboxRow",
    "apply_records",
    "backlogs",
    "enqueue_in",
    "expire_due",
    "get_command",
    "last_seqs",
    "list_commands",
    "load_unsettled",
    "new_command_id",
    "prune_settled",
]

# The most rows one listing returns (GET .../commands): a page for a person or a script.
MAX_LIST: Final = 500


class OutboxError(ValueError):
    """A command that cannot be accepted; the message says why."""


class CommandIdTaken(OutboxError):
    """The client-made command id is already used for another device."""


class CommandState(enum.StrEnum):
    QUEUED = "queued"
    SENT = "sent"
    ACKED = "acked"
    DEAD = "dead"


@attrs.frozen(kw_only=True)
class Enqueued:
    id: str
    device_id: str
    seq: int
    created: bool  # False: the id was already there (an idempotent repeat)
    # The command as stored, for a new one (None for a repeat): once its transaction has
    # committed, the dispatcher hands it to the device's link without reading it back.
    command: Command | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen(kw_only=True)
class OutboxRow:
    id: str
    device_id: str
    seq: int
    kind: str
    body: str
    expires_at: float | None
    state: CommandState
    reason: str
    attempts: int
    created_at: float
    sent_at: float | None
    settled_at: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "device_id": self.device_id, "seq": self.seq, "kind": self.kind,
                "body": json.loads(self.body), "expires_at": self.expires_at, "state": str(self.state),
                "reason": self.reason, "attempts": self.attempts, "created_at": self.created_at,
                "sent_at": self.sent_at, "settled_at": self.settled_at}


@attrs.frozen(kw_only=True)
class Backlog:
    """One device's unsettled commands: how many, and since when the oldest waits."""

    device_id: str
    depth: int
    unsent: int
    oldest_created_at: float
    oldest_unsent_at: float | None


_COLUMNS: Final = "id, device_id, seq, kind, body, expires_at, state, reason, attempts, created_at, sent_at, settled_at"


def _row(r: sqlite3.Row) -> OutboxRow:
    return OutboxRow(id=r["id"], device_id=r["device_id"], seq=r["seq"], kind=r["kind"], body=r["body"],
                     expires_at=r["expires_at"], state=CommandState(r["state"]), reason=r["reason"],
                     attempts=r["attempts"], created_at=r["created_at"], sent_at=r["sent_at"],
                     settled_at=r["settled_at"])


def new_command_id() -> str:
    """A fresh command id: ``c-`` and 24 hex digits (96 random bits)."""
    return f"c-{uuid.uuid4().hex[:24]}"


def enqueue_in(
    conn: sqlite3.Connection,
    device_id: str,
    kind: str,
    body: Mapping[str, Any],
    expires_at: float | None = None,
    *,
    command_id: str | None = None,
    now: float | None = None,
    body_text: str | None = None,
) -> Enqueued:
    """Add one command for ``device_id`` in the caller's transaction; the next seq is its.
    ``body_text``: ``body`` as :func:`~appliance.protocol.channel_codec.encode_body` gave it to
    a caller that checked it so (the command route), stored as it is rather than made again."""
    try:
        check_kind(kind)
        if body_text is None:
            body_text = encode_body(body)
        if command_id is not None:
            check_command_id(command_id)
    except ChannelProtocolError as exc:
        raise OutboxError(str(exc)) from exc
    if expires_at is not None and (isinstance(expires_at, bool) or not isinstance(expires_at, int | float)
                                   or not math.isfinite(expires_at)):
        raise OutboxError(f"expires_at must be a finite number of Unix seconds or None, got {expires_at!r}")
    if not device_id:
        raise OutboxError("a command needs a device id")
    if command_id is not None:
        old = conn.execute("SELECT device_id, seq FROM outbox WHERE id = ?", (command_id,)).fetchone()
        if old is not None:
            if old["device_id"] != device_id:
                raise CommandIdTaken(f"command id {command_id!r} is already used for device {old['device_id']!r}")
            return Enqueued(id=command_id, device_id=device_id, seq=old["seq"], created=False)
    seq: int = conn.execute(
        "INSERT INTO outbox_seq (device_id, last_seq) VALUES (?, 1) "
        "ON CONFLICT (device_id) DO UPDATE SET last_seq = last_seq + 1 RETURNING last_seq",
        (device_id,),
    ).fetchone()[0]
    new_id = command_id or new_command_id()
    expires = None if expires_at is None else float(expires_at)
    at = time.time() if now is None else now
    conn.execute(
        "INSERT INTO outbox (id, device_id, seq, kind, body, expires_at, state, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, 'queued', ?)",
        (new_id, device_id, seq, kind, body_text, expires, at),
    )
    command_queued(conn, new_id, device_id=device_id, seq=seq, kind=kind, body=body, body_text=body_text, now=at)
    return Enqueued(id=new_id, device_id=device_id, seq=seq, created=True,
                    command=Command(id=new_id, seq=seq, kind=kind, expires_at=expires, body=body_text))


def load_unsettled(conn: sqlite3.Connection, device_id: str, after_seq: int, limit: int) -> tuple[list[Command], int]:
    """Up to ``limit`` unsettled commands of a device with seq above ``after_seq``, in seq
    order, and the seq the next call may start after (so settled gaps are not re-read)."""
    rows = conn.execute(
        "SELECT id, seq, kind, body, expires_at FROM outbox "
        "WHERE device_id = ? AND seq > ? AND state IN ('queued', 'sent') ORDER BY seq LIMIT ?",
        (device_id, after_seq, limit),
    ).fetchall()
    commands = [Command(id=r["id"], seq=r["seq"], kind=r["kind"], expires_at=r["expires_at"], body=r["body"])
                for r in rows]
    if len(commands) == limit:
        return commands, commands[-1].seq
    last = conn.execute("SELECT last_seq FROM outbox_seq WHERE device_id = ?", (device_id,)).fetchone()
    return commands, max(after_seq, last["last_seq"] if last is not None else 0)


def last_seqs(conn: sqlite3.Connection) -> dict[str, int]:
    """The last seq given to each device (one small row per device ever commanded)."""
    return {r["device_id"]: r["last_seq"] for r in conn.execute("SELECT device_id, last_seq FROM outbox_seq")}


_APPLY: Final = {
    Sent: "UPDATE outbox SET state = 'sent', attempts = attempts + 1, sent_at = ? "
          "WHERE id = ? AND state IN ('queued', 'sent')",
    Acked: "UPDATE outbox SET state = 'acked', reason = '', settled_at = ? WHERE id = ? AND state != 'acked'",
    Dead: "UPDATE outbox SET state = 'dead', reason = ?, settled_at = ? WHERE id = ? AND state IN ('queued', 'sent')",
}


def _params(record: Record) -> tuple[Any, ...]:
    if isinstance(record, Dead):
        return (record.reason, record.at, record.id)
    return (record.at, record.id)


def apply_records(conn: sqlite3.Connection, records: Iterable[Record]) -> None:
    """Make what the send windows report durable, in order: sends, acks, deaths."""
    for kind, run in itertools.groupby(records, key=type):
        if kind is Sent:
            conn.executemany(_APPLY[kind], [_params(r) for r in run])
            continue
        # Acks and deaths one by one: each that changes a row is logged for the event stream.
        settled = "command.acked" if kind is Acked else "command.dead"
        for record in run:
            if conn.execute(_APPLY[kind], _params(record)).rowcount:
                command_changed(conn, settled, record.id, now=record.at)


def expire_due(conn: sqlite3.Connection, now: float) -> int:
    """Every unsettled command past its expiry becomes dead (devices offline, or not
    adopted, never see them); returns how many."""
    due = [r[0] for r in conn.execute("SELECT id FROM outbox WHERE state IN ('queued', 'sent') AND expires_at <= ?",
                                      (now,))]
    cur = conn.execute("UPDATE outbox SET state = 'dead', reason = 'expired before it could be delivered', "
                       "settled_at = ? WHERE state IN ('queued', 'sent') AND expires_at <= ?", (now, now))
    for command_id in due:
        command_changed(conn, "command.dead", command_id, now=now)
    return cur.rowcount


def prune_settled(conn: sqlite3.Connection, before: float) -> int:
    """Delete acked and dead commands settled before ``before``; returns how many."""
    cur = conn.execute("DELETE FROM outbox WHERE state IN ('acked', 'dead') AND settled_at < ?", (before,))
    return cur.rowcount


def backlogs(conn: sqlite3.Connection) -> list[Backlog]:
    """Per device with unsettled commands: depth, unsent count, and oldest times."""
    rows = conn.execute(
        "SELECT device_id, count(*) AS depth, sum(state = 'queued') AS unsent, min(created_at) AS oldest, "
        "min(CASE WHEN state = 'queued' THEN created_at END) AS oldest_unsent "
        "FROM outbox WHERE state IN ('queued', 'sent') GROUP BY device_id ORDER BY device_id"
    ).fetchall()
    return [Backlog(device_id=r["device_id"], depth=r["depth"], unsent=r["unsent"], oldest_created_at=r["oldest"],
                    oldest_unsent_at=r["oldest_unsent"]) for r in rows]


def get_command(conn: sqlite3.Connection, command_id: str) -> OutboxRow | None:
    r = conn.execute(f"SELECT {_COLUMNS} FROM outbox WHERE id = ?", (command_id,)).fetchone()
    return None if r is None else _row(r)


def list_commands(
    conn: sqlite3.Connection, device_id: str, state: CommandState | None = None, limit: int = 100
) -> list[OutboxRow]:
    """A device's commands, newest first, optionally in one state; at most ``limit`` (capped)."""
    limit = max(1, min(limit, MAX_LIST))
    if state is None:
        rows = conn.execute(f"SELECT {_COLUMNS} FROM outbox WHERE device_id = ? ORDER BY seq DESC LIMIT ?",
                            (device_id, limit)).fetchall()
    else:
        rows = conn.execute(f"SELECT {_COLUMNS} FROM outbox WHERE device_id = ? AND state = ? "
                            "ORDER BY seq DESC LIMIT ?", (device_id, str(state), limit)).fetchall()
    return [_row(r) for r in rows]
