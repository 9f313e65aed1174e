"""Facts about this box kept in the database: its id, generated once."""

from __future__ import annotations

import sqlite3
import uuid

__all__ = ["appliance_id", "get_meta", "set_meta"]


def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute(
        "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


def appliance_id(conn: sqlite3.Connection) -> str:
    """The box's id: made at first start, then the same for the life of the database."""
    existing = get_meta(conn, "appliance_id")
    if existing is not None:
        return existing
    new = f"box-{uuid.uuid4().hex[:12]}"
    set_meta(conn, "appliance_id", new)
    return new
