"""The media cache's rows and the replica reads the media service needs.

The files themselves live in ``<storage.dir>/media`` and belong to the media service;
this module keeps only which verified files exist and when each was last served. Every
function takes a connection inside the caller's transaction (``Database.read``/``write``).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, NamedTuple

from appliance.storage.event_log import append as log_event

__all__ = ["PlanRow", "add_blob", "blobs", "cached_bytes", "forget_blobs", "keys_listing",
           "keys_to_drop", "keys_to_point", "manifest_rows", "mark_served", "pinned_keys", "plan_rows",
           "replica_changed_at", "served_file", "set_key_blobs", "still_serving", "unlisted_blobs"]

# The manifest's usable entries as (key, sha, size): every row but the keys in the JSON array
# bound to :bad (the entries that fail ``appliance.protocol.media.parse_entry``, found by the
# caller's own pass; usually none). The values are the ones parse_entry gives a valid entry.
_ENTRIES: Final = ("entries AS (SELECT key, lower(json_extract(data, '$.sha256')) AS sha, "
                   "json_extract(data, '$.size') AS size FROM media_manifest "
                   "WHERE key NOT IN (SELECT value FROM json_each(:bad)))")
# Media keys the shop is using: an active product's ``image`` (``active`` not false), or any
# string of the store's configuration that is a key of the manifest.
_PINNED: Final = ("SELECT json_extract(p.data, '$.image') FROM products AS p "
                  "WHERE coalesce(json_extract(p.data, '$.active'), 1) != 0 "
                  "AND json_extract(p.data, '$.image') IN (SELECT key FROM media_manifest) "
                  "UNION SELECT t.value FROM store_config AS c, json_tree(c.data) AS t "
                  "WHERE t.type = 'text' AND t.value IN (SELECT key FROM media_manifest)")


def served_file(conn: sqlite3.Connection, key: str) -> tuple[dict[str, Any], str | None] | None:
    """The manifest entry of ``key`` and the sha256 of the verified file it is served from
    (None: not cached); None if the manifest does not list ``key``."""
    row = conn.execute("SELECT m.data, k.sha256 FROM media_manifest AS m LEFT JOIN media_keys AS k ON k.key = m.key "
                       "WHERE m.key = ?", (key,)).fetchone()
    if row is None:
        return None
    data: Any = json.loads(row[0])
    return (data if isinstance(data, dict) else {}), row[1]


def set_key_blobs(conn: sqlite3.Connection, serve: Mapping[str, str], *, drop: Iterable[str] = ()) -> None:
    """Serve each key of ``serve`` from its sha256; stop serving the keys in ``drop``.
    Each key that now serves a new file is logged (``media.cached``) for the event stream."""
    fresh = [k for k, sha in sorted(serve.items())
             if (row := conn.execute("SELECT sha256 FROM media_keys WHERE key = ?", (k,)).fetchone()) is None
             or row[0] != sha]
    conn.executemany("DELETE FROM media_keys WHERE key = ?", [(k,) for k in drop])
    conn.executemany("INSERT INTO media_keys(key, sha256) VALUES (?, ?) "
                     "ON CONFLICT(key) DO UPDATE SET sha256 = excluded.sha256", list(serve.items()))
    if fresh:
        cached = conn.execute("SELECT count(*) FROM media_keys").fetchone()[0]
        total = conn.execute("SELECT count(*) FROM media_manifest").fetchone()[0]
        now = time.time()
        for key in fresh:
            size = conn.execute("SELECT size FROM media_blobs WHERE sha256 = ?", (serve[key],)).fetchone()
            log_event(conn, "media.cached", {"key": key, "sha256": serve[key], "size": size[0] if size else None,
                                             "cached": cached, "total": total}, now=now, subject=key)


def replica_changed_at(conn: sqlite3.Connection) -> float | None:
    """When the replica last changed (None: never synced)."""
    row = conn.execute("SELECT last_change_at FROM sync_state WHERE id = 1").fetchone()
    return None if row is None else row[0]


def pinned_keys(conn: sqlite3.Connection) -> frozenset[str]:
    """Media keys the shop is using: an active product's ``image`` (``active`` not false), or
    any string of the store's configuration that is a key of the manifest."""
    return frozenset(row[0] for row in conn.execute(_PINNED))


def manifest_rows(conn: sqlite3.Connection) -> Iterator[tuple[str, str]]:
    """Every media entry of the replica as ``(key, JSON text)``, one row at a time."""
    yield from conn.execute("SELECT key, data FROM media_manifest")


class PlanRow(NamedTuple):
    """One blob of the manifest (the entries sharing a sha256), as the plan walks them."""

    sha256: str
    size: int  # the largest size its entries give
    first_key: str
    first_data: str  # the first key's entry, JSON
    keys: str  # every key, a JSON array
    entries: int
    entry_bytes: int  # the sum of its entries' sizes
    pinned: bool
    last_served_at: float  # 0: never
    cached_size: int | None  # the verified cached file's size; None: not cached


def plan_rows(conn: sqlite3.Connection, bad: Sequence[str]) -> Iterator[PlanRow]:
    """The manifest's blobs in the plan's order (docs/media.md: pinned first, then the most
    recently served, then by first key), one at a time: the walk holds one row, however
    large the catalog. ``bad``: keys left out (entries that cannot be used)."""
    rows = conn.execute(
        f"WITH {_ENTRIES}, pinned(key) AS ({_PINNED}), "
        "blobs AS (SELECT sha, max(size) AS size, min(key) AS first_key, "
        "json_group_array(key) AS keys, count(*) AS n, sum(size) AS entry_bytes, "
        "max(key IN (SELECT key FROM pinned)) AS pinned FROM entries GROUP BY sha) "
        "SELECT b.sha, b.size, b.first_key, f.data, b.keys, b.n, b.entry_bytes, b.pinned, "
        "coalesce(c.last_served_at, 0) AS served, c.size "
        "FROM blobs AS b JOIN media_manifest AS f ON f.key = b.first_key "
        "LEFT JOIN media_blobs AS c ON c.sha256 = b.sha "
        "ORDER BY b.pinned DESC, served DESC, b.first_key",
        {"bad": json.dumps(list(bad))})
    for row in rows:
        yield PlanRow(row[0], row[1], row[2], row[3], row[4], row[5], row[6], bool(row[7]), row[8], row[9])


def cached_bytes(conn: sqlite3.Connection) -> int:
    """The bytes of every verified cached file."""
    return int(conn.execute("SELECT coalesce(sum(size), 0) FROM media_blobs").fetchone()[0])


def unlisted_blobs(conn: sqlite3.Connection, bad: Sequence[str]) -> list[tuple[str, int]]:
    """``(sha256, size)`` of the cached files no usable entry of the manifest names."""
    return conn.execute(f"WITH {_ENTRIES} SELECT sha256, size FROM media_blobs "
                        "WHERE sha256 NOT IN (SELECT sha FROM entries)", {"bad": json.dumps(list(bad))}).fetchall()


def still_serving(conn: sqlite3.Connection, bad: Sequence[str]) -> set[str]:
    """The cached files still serving a key whose entry changed to bytes not cached yet: a
    changed entry keeps its previous file until the new one is verified."""
    return {row[0] for row in conn.execute(
        f"WITH {_ENTRIES} SELECT DISTINCT k.sha256 FROM media_keys AS k JOIN entries AS m ON m.key = k.key "
        "WHERE m.sha != k.sha256 AND m.sha NOT IN (SELECT sha256 FROM media_blobs)", {"bad": json.dumps(list(bad))})}


def keys_to_point(conn: sqlite3.Connection, bad: Sequence[str], limit: int) -> list[tuple[str, str]]:
    """Up to ``limit`` ``(key, sha256)``: usable entries whose bytes are cached but which are
    not served from that file yet."""
    return conn.execute(
        f"WITH {_ENTRIES} SELECT m.key, m.sha FROM entries AS m JOIN media_blobs AS c ON c.sha256 = m.sha "
        "LEFT JOIN media_keys AS k ON k.key = m.key WHERE k.sha256 IS NOT m.sha ORDER BY m.key LIMIT :limit",
        {"bad": json.dumps(list(bad)), "limit": limit}).fetchall()


def keys_to_drop(conn: sqlite3.Connection, bad: Sequence[str], limit: int) -> list[str]:
    """Up to ``limit`` keys served from a file that no usable entry of the manifest lists."""
    return [row[0] for row in conn.execute(
        f"WITH {_ENTRIES} SELECT key FROM media_keys WHERE key NOT IN (SELECT key FROM entries) LIMIT :limit",
        {"bad": json.dumps(list(bad)), "limit": limit})]


def keys_listing(conn: sqlite3.Connection, keys: Iterable[str], sha256: str) -> list[str]:
    """Those of ``keys`` whose manifest entry names the bytes ``sha256`` now."""
    return [row[0] for row in conn.execute(
        "SELECT key FROM media_manifest WHERE key IN (SELECT value FROM json_each(?)) "
        "AND lower(json_extract(data, '$.sha256')) = ?", (json.dumps(list(keys)), sha256))]


def blobs(conn: sqlite3.Connection) -> dict[str, tuple[int, float]]:
    """sha256 -> (size, last served at) of every verified cached file."""
    return {row[0]: (row[1], row[2]) for row in conn.execute("SELECT sha256, size, last_served_at FROM media_blobs")}


def add_blob(conn: sqlite3.Connection, sha256: str, size: int, *, now: float) -> None:
    conn.execute("INSERT INTO media_blobs(sha256, size, cached_at) VALUES (?, ?, ?) "
                 "ON CONFLICT(sha256) DO UPDATE SET size = excluded.size, cached_at = excluded.cached_at",
                 (sha256, size, now))


def forget_blobs(conn: sqlite3.Connection, shas: Iterable[str]) -> None:
    """Drop the rows of these files, and every key served from them."""
    rows = [(s,) for s in shas]
    conn.executemany("DELETE FROM media_keys WHERE sha256 = ?", rows)
    conn.executemany("DELETE FROM media_blobs WHERE sha256 = ?", rows)


def mark_served(conn: sqlite3.Connection, served: Mapping[str, float]) -> None:
    conn.executemany("UPDATE media_blobs SET last_served_at = max(last_served_at, ?) WHERE sha256 = ?",
                     [(at, sha) for sha, at in served.items()])
