"""The database across firmware slots: a snapshot before a new slot first opens it, and its
restore, with the shop's records carried over, when the trial fails (docs/updates.md).

Migrations are forward-only and a database newer than the firmware is refused
(:mod:`appliance.storage.schema`), so a slot that migrated the database leaves the old slot
unable to start on it. Hence:

- :func:`take_snapshot`, in the new slot before :class:`~appliance.storage.db.Database`
  opens (and migrates) the file: a consistent copy through SQLite's backup API, fsynced,
  then renamed into place (a power cut leaves the old snapshot or none, never half of one).
- :func:`restore_snapshot`, in the old slot when it is back after a failed trial, before it
  opens the database: the trial's database is moved aside (kept for support), the snapshot
  takes its place, and every record the shop made during the trial is **carried over**:
  the sales and orders devices posted, the online orders taken, and the events for the
  platform, inserted by their ids (a row already there is left alone). Events the trial
  had in flight go back to the queue; the platform dedupes by id, so one it already took is
  taken once. Only the columns both schemas have are copied; a table the old schema lacks
  is skipped and counted.

Everything here blocks: call it before the event loop opens the database, or in a thread.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import attrs

__all__ = ["CARRIED_TABLES", "Carried", "TrialStorageError", "restore_snapshot", "take_snapshot"]

# The shop's records a trial may have made, by table, with the column that identifies a
# row (kept) and the columns never copied (the old schema's own counters).
CARRIED_TABLES: Final = (
    ("device_sales", ()),
    ("device_orders", ()),
    ("online_orders", ()),
    ("events_outbox", ("seq",)),  # AUTOINCREMENT: the restored database numbers them after its own
)


class TrialStorageError(Exception):
    """A snapshot could not be taken or restored (the text says which file and why)."""


@attrs.frozen(kw_only=True)
class Carried:
    rows: dict[str, int]
    skipped: tuple[str, ...]  # tables the trial had that this schema lacks (or the reverse)

    @property
    def total(self) -> int:
        return sum(self.rows.values())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _connect(path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def take_snapshot(db_path: Path, snapshot_path: Path) -> bool:
    """Copy ``db_path`` (with its WAL) to ``snapshot_path``; False when there is no database yet.

    The copy goes to a temporary name, is fsynced, then renamed: ``snapshot_path`` is a
    whole, consistent database or absent."""
    if not db_path.is_file():
        return False
    tmp = snapshot_path.with_name(snapshot_path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        with _connect(db_path) as src, _connect(tmp) as dst:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode = DELETE")
        _put_in_place(tmp, snapshot_path)
    except (sqlite3.Error, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise TrialStorageError(f"cannot snapshot {db_path} to {snapshot_path}: {exc}") from exc
    return True


def _put_in_place(tmp: Path, dest: Path) -> None:
    """A finished copy made durable, then renamed over ``dest`` (its folder synced too)."""
    os.chmod(tmp, 0o600)
    _fsync(tmp)
    os.replace(tmp, dest)
    _fsync(dest.parent)


def _columns(conn: sqlite3.Connection, schema: str, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f"PRAGMA {schema}.table_info({table})")]


def _move_aside(db_path: Path, aside: Path) -> None:
    """The trial's database (and its -wal/-shm) under ``aside``'s name."""
    for suffix in ("", "-wal", "-shm"):
        src = db_path.with_name(db_path.name + suffix)
        if src.exists():
            os.replace(src, aside.with_name(aside.name + suffix))


def restore_snapshot(db_path: Path, snapshot_path: Path, aside: Path) -> Carried:
    """Put the snapshot back in place of the trial's database, carrying the shop's records.

    ``aside``: where the trial's database is kept. Crash-safe by order: the trial's file is
    moved aside first, the snapshot copied to a temporary name, the records carried into the
    copy in one transaction, the copy fsynced, then renamed into place; a crash at any step
    leaves the snapshot and the trial's file, so the restore is simply run again."""
    if not snapshot_path.is_file():
        raise TrialStorageError(f"no snapshot at {snapshot_path} to restore")
    if db_path.exists() and not aside.exists():
        _move_aside(db_path, aside)
    for suffix in ("", "-wal", "-shm"):  # a crash during an earlier restore
        db_path.with_name(db_path.name + suffix).unlink(missing_ok=True)
    tmp = db_path.with_name(db_path.name + ".restore")
    tmp.unlink(missing_ok=True)
    rows: dict[str, int] = {}
    skipped: list[str] = []
    try:
        with _connect(snapshot_path) as src, _connect(tmp) as dst:
            src.backup(dst)
            if aside.exists():
                rows, skipped = _carry(dst, aside)
        _put_in_place(tmp, db_path)
    except (sqlite3.Error, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise TrialStorageError(f"cannot restore {snapshot_path} to {db_path}: {exc}") from exc
    return Carried(rows=rows, skipped=tuple(skipped))


def _carry(dst: sqlite3.Connection, trial: Path) -> tuple[dict[str, int], list[str]]:
    rows: dict[str, int] = {}
    skipped: list[str] = []
    dst.execute("ATTACH DATABASE ? AS trial", (str(trial),))  # only read from
    try:
        dst.execute("BEGIN IMMEDIATE")
        for table, never in CARRIED_TABLES:
            ours, theirs = _columns(dst, "main", table), _columns(dst, "trial", table)
            if not ours or not theirs:
                skipped.append(table)
                continue
            cols = [c for c in ours if c in theirs and c not in never]
            names = ", ".join(f'"{c}"' for c in cols)
            order = " ORDER BY seq" if "seq" in theirs else ""
            before = dst.total_changes
            dst.execute(f"INSERT OR IGNORE INTO main.{table} ({names}) SELECT {names} FROM trial.{table}{order}")
            rows[table] = dst.total_changes - before
        if "state" in _columns(dst, "main", "events_outbox"):
            # In flight during the trial: unknown whether the platform took them; send again.
            dst.execute("UPDATE main.events_outbox SET state = 'queued', batch_key = NULL WHERE state = 'sent'")
        dst.execute("COMMIT")
    except sqlite3.Error:
        if dst.in_transaction:
            dst.execute("ROLLBACK")
        raise
    finally:
        dst.execute("DETACH DATABASE trial")
    return rows, skipped
