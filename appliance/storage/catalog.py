"""The replica of the store's data (products, prices, stock, configuration, media manifest,
devices) and the sync cursor that says how far it is.

Every function takes a connection inside the caller's transaction (``Database.write`` or
``Database.read``): :func:`apply_changes` writes a page of changes *and* the cursor that
covers them in that one transaction, so after a crash the replica and the cursor always
agree (CouchDB's checkpoint and PowerSync's bucket cursor keep the same rule).

A snapshot is written batch by batch into a shadow of each replica table (``products__next``
and so on, made by :func:`begin_snapshot` with the table's own definition) and swapped in
by :func:`finish_snapshot` in one short transaction that renames the tables (no row is
copied); until then readers see the old replica. The old tables are dropped afterwards by
:func:`drop_old_replica`, in a transaction of their own. A snapshot interrupted by a crash
starts again from zero (see :func:`begin_snapshot`).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any, Final

import attrs

from appliance.protocol.sync import SnapshotRecord
from appliance.storage.event_log import append as log_event
from appliance.storage.event_log import replica_changed

__all__ = [
    "ENTITY_TABLES",
    "PRODUCT_PAGE_MAX",
    "STAGE_ROWS_PER_STATEMENT",
    "BadPageToken",
    "ReplicaWrite",
    "SyncState",
    "apply_changes",
    "begin_snapshot",
    "decode_after",
    "drop_old_replica",
    "encode_after",
    "finish_snapshot",
    "get_item",
    "get_item_text",
    "name_key",
    "replica_counts",
    "require_snapshot",
    "search_products",
    "set_store",
    "stage_rows",
    "sync_state",
]

# Entity name of the changes feed -> replica table (docs/architecture.md §4). The key column of the
# first three is the SKU; the others are keyed by the platform's key.
ENTITY_TABLES: Final = {
    "product": "products",
    "price": "prices",
    "stock": "stock",
    "store_config": "store_config",
    "media": "media_manifest",
    "device": "store_devices",
}
_KEY_COLUMN: Final = {"products": "sku", "prices": "sku", "stock": "sku"}

# The most products one search page returns: a POS screen shows tens.
PRODUCT_PAGE_MAX: Final = 200
# A page token is a name key and a SKU; refuse anything longer than a sane pair.
_TOKEN_MAX_CHARS: Final = 2048


class BadPageToken(ValueError):
    """An ``after`` token that this box did not make."""


@attrs.frozen(kw_only=True)
class ReplicaWrite:
    """One row to upsert (``data`` is JSON text) or delete (``data`` is None)."""

    entity: str
    key: str
    data: str | None
    seq: int = 0
    name: str = ""  # products only: the display name, searched by prefix


@attrs.frozen(kw_only=True)
class SyncState:
    store_id: str
    cursor: str | None
    last_pull_at: float | None
    last_change_at: float | None
    snapshots: int
    staged_rows: int

    @property
    def snapshot_needed(self) -> bool:
        return self.cursor is None


def name_key(name: str) -> str:
    """What a name is searched by: casefolded, so "É" finds "é" and "STRASSE" finds "straße"."""
    return name.casefold()


def _column(table: str) -> str:
    return _KEY_COLUMN.get(table, "key")


def _upsert(conn: sqlite3.Connection, table: str, write: ReplicaWrite) -> None:
    col = _column(table)
    if table == "products":
        conn.execute(
            "INSERT INTO products(sku, name, name_key, data, seq) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(sku) DO UPDATE SET name = excluded.name, name_key = excluded.name_key, "
            "data = excluded.data, seq = excluded.seq",
            (write.key, write.name, name_key(write.name), write.data, write.seq),
        )
    else:
        conn.execute(
            f"INSERT INTO {table}({col}, data, seq) VALUES (?, ?, ?) "
            f"ON CONFLICT({col}) DO UPDATE SET data = excluded.data, seq = excluded.seq",
            (write.key, write.data, write.seq),
        )


def apply_changes(conn: sqlite3.Connection, writes: Iterable[ReplicaWrite], *, cursor: str, now: float) -> int:
    """Apply one page of changes and advance the cursor, in the caller's transaction.

    Writes of an entity this firmware does not know are skipped (the platform may add
    entities before the box learns them); the cursor still advances past them. Returns
    the number of rows written or deleted.
    """
    done = 0
    for write in writes:
        table = ENTITY_TABLES.get(write.entity)
        if table is None:
            continue
        if write.data is None:
            conn.execute(f"DELETE FROM {table} WHERE {_column(table)} = ?", (write.key,))
        else:
            _upsert(conn, table, write)
        replica_changed(conn, entity=write.entity, key=write.key, data=write.data, name=write.name, now=now)
        done += 1
    if done:
        log_event(conn, "sync.pulled", {"changes": done}, now=now)
    conn.execute(
        "UPDATE sync_state SET cursor = ?, last_pull_at = ?, "
        "last_change_at = CASE WHEN ? > 0 THEN ? ELSE last_change_at END WHERE id = 1",
        (cursor, now, done, now),
    )
    return done


def sync_state(conn: sqlite3.Connection) -> SyncState:
    row = conn.execute(
        "SELECT store_id, cursor, last_pull_at, last_change_at, snapshots, staged_rows FROM sync_state WHERE id = 1"
    ).fetchone()
    return SyncState(store_id=row[0], cursor=row[1], last_pull_at=row[2], last_change_at=row[3],
                     snapshots=row[4], staged_rows=row[5])


def require_snapshot(conn: sqlite3.Connection) -> None:
    """Forget the cursor: the next pull reads the snapshot (after a 410 Gone)."""
    conn.execute("UPDATE sync_state SET cursor = NULL WHERE id = 1")


def set_store(conn: sqlite3.Connection, store_id: str) -> bool:
    """Record which store the replica is of; a different store forgets the cursor (the
    next pull reads that store's snapshot, which replaces the replica). True if changed."""
    current = conn.execute("SELECT store_id FROM sync_state WHERE id = 1").fetchone()[0]
    if current == store_id:
        return False
    conn.execute("UPDATE sync_state SET store_id = ?, cursor = NULL WHERE id = 1", (store_id,))
    return True


# --- snapshots -------------------------------------------------------------------


_NEXT: Final = "__next"  # a replica table's shadow, filled by the snapshot being read
_OLD: Final = "__old"  # a replica table swapped out, dropped after the swap
# Rows one staging INSERT writes. Python's sqlite3 lets go of the GIL around each step of a
# statement, and ``executemany`` steps once per row: with the snapshot parsed in trio's
# thread at the same moment, the writer thread waited for the GIL again after every row
# (up to the 5 ms switch interval each time; the 100k catalog's 400,000 rows took 1.3 s
# alone and 16 s beside a busy thread). A statement of many rows waits once per statement.
# 200 rows of at most 4 values stay under SQLite's oldest limit of 999 bound values.
STAGE_ROWS_PER_STATEMENT: Final = 200


def _definition(conn: sqlite3.Connection, table: str, as_name: str) -> str:
    """``table``'s CREATE TABLE statement, naming ``as_name`` instead (the schema's own
    definition, so the shadow is whatever the migrations made of the table)."""
    sql: str = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?",
                            (table,)).fetchone()[0]
    return re.sub(rf'^CREATE TABLE\s+"?{table}"?', f"CREATE TABLE {as_name}", sql, count=1)


def begin_snapshot(conn: sqlite3.Connection) -> None:
    """Start a snapshot from zero, dropping whatever an interrupted one had staged.

    Not resumable on purpose: §4's snapshot has no id or offset, so a new request reads
    the store at a new point in time. Keeping the rows staged from an older read would
    mix two points in time, and a row deleted between them would survive the swap with
    nothing later to delete it (the new cursor is already past that delete).
    """
    for table in ENTITY_TABLES.values():
        conn.execute(f"DROP TABLE IF EXISTS {table}{_NEXT}")
        conn.execute(_definition(conn, table, f"{table}{_NEXT}"))
    conn.execute("DELETE FROM snapshot_staging")  # left by an older version's interrupted snapshot
    conn.execute("UPDATE sync_state SET staged_rows = 0 WHERE id = 1")


def _insert_rows(conn: sqlite3.Connection, head: str, row: str, values: list[Any], width: int) -> None:
    """Run ``head`` followed by ``row`` once per row of ``values`` (a flat list, ``width``
    values a row), :data:`STAGE_ROWS_PER_STATEMENT` rows a statement."""
    per = STAGE_ROWS_PER_STATEMENT * width
    whole = len(values) - len(values) % per
    if whole:
        conn.executemany(head + ",".join([row] * STAGE_ROWS_PER_STATEMENT),
                         [values[at:at + per] for at in range(0, whole, per)])
    if whole < len(values):
        conn.execute(head + ",".join([row] * ((len(values) - whole) // width)), values[whole:])


def stage_rows(conn: sqlite3.Connection, rows: Sequence[ReplicaWrite | SnapshotRecord]) -> int:
    """Stage one batch of snapshot rows into the shadow tables (a later row for the same
    key replaces the earlier, within a statement as across them). Rows of an entity this
    firmware does not know are counted and skipped, as the swap always did."""
    products: list[Any] = []
    others: dict[str, list[Any]] = {}
    for r in rows:
        if r.data is None:
            continue
        if r.entity == "product":
            products += (r.key, r.name, name_key(r.name), r.data)
        else:
            table = ENTITY_TABLES.get(r.entity)
            if table is not None:
                others.setdefault(table, []).extend((r.key, r.data))
    if products:
        _insert_rows(conn, f"INSERT OR REPLACE INTO products{_NEXT}(sku, name, name_key, data, seq) VALUES ",
                     "(?, ?, ?, ?, 0)", products, 4)
    for table, values in others.items():
        _insert_rows(conn, f"INSERT OR REPLACE INTO {table}{_NEXT}({_column(table)}, data, seq) VALUES ",
                     "(?, ?, 0)", values, 2)
    conn.execute("UPDATE sync_state SET staged_rows = staged_rows + ? WHERE id = 1", (len(rows),))
    return len(rows)


def finish_snapshot(conn: sqlite3.Connection, *, cursor: str, now: float) -> dict[str, int]:
    """Swap the staged snapshot into the replica and set its cursor, in one transaction.

    Every replica table is replaced, including entities absent from the snapshot (the
    store has none of them now). The swap renames tables and rebuilds the few secondary
    indexes: no row is copied, so the writer is held for the index builds only (see
    docs/architecture.md §4). Returns the row count per entity. Call
    :func:`drop_old_replica` after it commits.
    """
    counts: dict[str, int] = {}
    for entity, table in ENTITY_TABLES.items():
        conn.execute(f"DROP TABLE IF EXISTS {table}{_OLD}")  # a swap whose clean-up a crash prevented
        indexes = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ? "
                               "AND sql IS NOT NULL", (table,)).fetchall()
        for index in indexes:
            conn.execute(f'DROP INDEX "{index[0]}"')
        conn.execute(f"ALTER TABLE {table} RENAME TO {table}{_OLD}")
        conn.execute(f"ALTER TABLE {table}{_NEXT} RENAME TO {table}")
        for index in indexes:
            conn.execute(index[1])
        counts[entity] = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    conn.execute(
        "UPDATE sync_state SET cursor = ?, last_pull_at = ?, last_change_at = ?, snapshots = snapshots + 1, "
        "staged_rows = 0 WHERE id = 1",
        (cursor, now, now),
    )
    # Clients drop what they hold of the catalog and read it again (docs/events.md).
    log_event(conn, "catalog.replaced", {"counts": counts}, now=now)
    log_event(conn, "sync.snapshot", {"counts": counts}, now=now)
    return counts


def drop_old_replica(conn: sqlite3.Connection) -> None:
    """Drop the tables a snapshot's swap replaced (their pages go to the free list, for
    the next snapshot to reuse)."""
    for table in ENTITY_TABLES.values():
        conn.execute(f"DROP TABLE IF EXISTS {table}{_OLD}")


# --- reads for the store API -------------------------------------------------------


def get_item(conn: sqlite3.Connection, entity: str, key: str) -> dict[str, Any] | None:
    """One replica row as the platform sent it, with its key set; None if absent."""
    table = ENTITY_TABLES[entity]
    col = _column(table)
    row = conn.execute(f"SELECT data FROM {table} WHERE {col} = ?", (key,)).fetchone()
    if row is None:
        return None
    item: dict[str, Any] = json.loads(row[0])
    item[col] = key
    return item


def get_item_text(conn: sqlite3.Connection, entity: str, key: str) -> str | None:
    """One replica row's JSON text as stored (its key not yet set, see :func:`get_item`)."""
    table = ENTITY_TABLES[entity]
    row = conn.execute(f"SELECT data FROM {table} WHERE {_column(table)} = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def encode_after(name_key_: str, sku: str) -> str:
    raw = json.dumps([name_key_, sku], ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_after(token: str) -> tuple[str, str]:
    """The (name key, sku) a page token stands for, or :class:`BadPageToken`."""
    if len(token) > _TOKEN_MAX_CHARS:
        raise BadPageToken("page token too long")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        value = json.loads(raw.decode("utf-8"))
    except (binascii.Error, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadPageToken("not a page token from this API") from exc
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
        raise BadPageToken("not a page token from this API")
    try:
        value[0].encode("utf-8")
        value[1].encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadPageToken("not a page token from this API") from exc
    return value[0], value[1]


def _prefix_upper(prefix: str) -> str | None:
    """The smallest string above every string that starts with ``prefix`` (None: no bound).

    SQLite's BINARY collation compares UTF-8 bytes, which orders like code points, so the
    range ``[prefix, upper)`` is exactly the strings starting with ``prefix`` and the
    ``products_by_name`` index serves it.
    """
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        nxt = last + 1
        if 0xD800 <= nxt <= 0xDFFF:  # surrogates are not characters: skip over them
            nxt = 0xE000
        if nxt <= 0x10FFFF:
            return "".join(chars) + chr(nxt)
    return None


def search_products(
    conn: sqlite3.Connection, prefix: str, *, limit: int, after: tuple[str, str] | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """Products whose name starts with ``prefix`` (casefolded), by name then SKU, one page.

    Keyset paging: the token names the last (name, sku) seen, so pages stay correct
    while the replica changes underneath and cost the same at any depth.
    """
    key = name_key(prefix)
    clauses = ["name_key >= ?"]
    params: list[Any] = [key]
    upper = _prefix_upper(key)
    if upper is not None:
        clauses.append("name_key < ?")
        params.append(upper)
    if after is not None:
        clauses.append("(name_key, sku) > (?, ?)")
        params.extend(after)
    params.append(limit + 1)
    rows = conn.execute(
        f"SELECT sku, name_key, data FROM products WHERE {' AND '.join(clauses)} "
        "ORDER BY name_key, sku LIMIT ?", params).fetchall()
    items = []
    for row in rows[:limit]:
        item = json.loads(row[2])
        item["sku"] = row[0]
        items.append(item)
    token = encode_after(rows[limit - 1][1], rows[limit - 1][0]) if len(rows) > limit else None
    return items, token


def replica_counts(conn: sqlite3.Connection) -> dict[str, int]:
    return {entity: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for entity, table in ENTITY_TABLES.items()}
