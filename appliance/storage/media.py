"""The media cache's rows and the replica reads the media service needs.

The files themselves live in ``<storage.dir>/media`` and belong to the media service;
this module keeps only which verified files exist and when each was last served. Every
function takes a connection inside the caller's transaction (``Database.read``/``write``).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Mapping
from typing import Any

from appliance.storage.event_log import append as log_event

__all__ = ["add_blob", "blobs", "forget_blobs", "key_blobs", "manifest", "mark_served", "pinned_keys",
           "replica_changed_at", "served_file", "set_key_blobs"]


def manifest(conn: sqlite3.Connection) -> list[tuple[str, dict[str, Any]]]:
    """Every media entry of the replica as ``(key, data)``, by key."""
    return [(row[0], json.loads(row[1])) for row in conn.execute("SELECT key, data FROM media_manifest ORDER BY key")]


def served_file(conn: sqlite3.Connection, key: str) -> tuple[dict[str, Any], str | None] | None:
    """The manifest entry of ``key`` and the sha256 of the verified file it is served from
    (None: not cached); None if the manifest does not list ``key``."""
    row = conn.execute("SELECT m.data, k.sha256 FROM media_manifest AS m LEFT JOIN media_keys AS k ON k.key = m.key "
                       "WHERE m.key = ?", (key,)).fetchone()
    if row is None:
        return None
    data: Any = json.loads(row[0])
    return (data if isinstance(data, dict) else {}), row[1]


def key_blobs(conn: sqlite3.Connection) -> dict[str, str]:
    """key -> sha256 of the verified file each key is served from."""
    return {row[0]: row[1] for row in conn.execute("SELECT key, sha256 FROM media_keys")}


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
    rows = conn.execute(
        "SELECT DISTINCT json_extract(p.data, '$.image') FROM products AS p "
        "WHERE coalesce(json_extract(p.data, '$.active'), 1) != 0 "
        "AND json_extract(p.data, '$.image') IN (SELECT key FROM media_manifest) "
        "UNION SELECT DISTINCT t.value FROM store_config AS c, json_tree(c.data) AS t "
        "WHERE t.type = 'text' AND t.value IN (SELECT key FROM media_manifest)")
    return frozenset(row[0] for row in rows)


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
