"""The schema: forward-only migrations, numbered, applied in order.

Each migration is ``migrations/NNNN_name.sql``. ``PRAGMA user_version`` holds the number of
the last one applied; opening a database applies every later one, each in its own
transaction together with the new ``user_version``, so a crash mid-migration leaves the
database at the previous version. A database newer than this firmware is refused rather
than guessed at (a downgrade must not silently drop data).
"""

from __future__ import annotations

import re
import sqlite3
from importlib import resources
from typing import Final

import attrs

__all__ = ["Migration", "SchemaError", "load_migrations", "migrate"]

_NAME: Final = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class SchemaError(Exception):
    """The database cannot be brought to this firmware's schema."""


@attrs.frozen(kw_only=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> tuple[Migration, ...]:
    """Every migration shipped in the package, in version order."""
    found = []
    for entry in resources.files("appliance.storage.migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(version=int(match[1]), name=match[2], sql=entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise SchemaError(f"two migrations share a number: {versions}")
    return tuple(found)


def migrate(conn: sqlite3.Connection, migrations: tuple[Migration, ...] | None = None) -> int:
    """Apply pending migrations; return the resulting schema version."""
    migrations = load_migrations() if migrations is None else migrations
    current: int = conn.execute("PRAGMA user_version").fetchone()[0]
    latest = migrations[-1].version if migrations else 0
    if current > latest:
        raise SchemaError(
            f"database schema version {current} is newer than this firmware knows ({latest}); "
            "install newer firmware or restore a backup"
        )
    for m in migrations:
        if m.version <= current:
            continue
        # executescript commits any open transaction first, so the BEGIN/COMMIT live in
        # the script itself; user_version is set inside the same transaction.
        try:
            conn.executescript(f"BEGIN IMMEDIATE;\n{m.sql}\nPRAGMA user_version = {m.version};\nCOMMIT;")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.rollback()
            raise SchemaError(f"migration {m.version:04d}_{m.name} failed: {exc}") from exc
        current = m.version
    return current
