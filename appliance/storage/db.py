"""The one SQLite database: WAL mode, one writer, readers in parallel, all off the event loop.

Every function passed to :meth:`Database.write` runs in a worker thread inside one
``BEGIN IMMEDIATE`` transaction, committed before ``write`` returns: with
``synchronous=FULL`` the data is on disk when the caller goes on to acknowledge it to
anyone. Writers are serialised by a lock (SQLite allows one writer anyway; queuing in
trio is cheaper than busy-waiting in SQLite). Readers use a small pool of connections and
see the last committed state (WAL).

Cancellation: a write that has started in its thread runs to completion (trio's default
``abandon_on_cancel=False``): a cancelled caller never leaves a half-done transaction, and
the cancel takes effect once the thread returns. A write that raises is rolled back.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final, TypeVar

import trio

from appliance.storage.schema import migrate

__all__ = ["DATABASE_FILE", "Database", "StorageError", "connect"]

# The database's file name inside the state directory (storage.dir).
DATABASE_FILE: Final = "appliance.db"

T = TypeVar("T")

# Readers in parallel: the HTTP listeners' lookups; two cores, so a few is plenty.
READERS: Final = 4
# How long a connection waits on SQLite's own lock (another process, e.g. a CLI command).
BUSY_TIMEOUT_MS: Final = 5000


class StorageError(Exception):
    """The database cannot be opened or used."""


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open one connection with the appliance's settings (autocommit; explicit BEGIN)."""
    try:
        if readonly:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                                   check_same_thread=False)
        else:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        if not readonly:
            conn.execute("PRAGMA journal_mode = WAL")
            # FULL: a commit survives a power cut, not just a process crash.
            conn.execute("PRAGMA synchronous = FULL")
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open database {path}: {exc}") from exc
    conn.row_factory = sqlite3.Row
    return conn


class Database:
    """The appliance's database. Open with :meth:`open`; close with :meth:`close`."""

    def __init__(self, path: Path, writer: sqlite3.Connection, readers: list[sqlite3.Connection]) -> None:
        self.path = path
        self._writer = writer
        self._write_lock = trio.Lock()
        self._readers = readers
        self._reader_slots = trio.Semaphore(len(readers))
        self._reader_pick = threading.Lock()
        self.schema_version: int = writer.execute("PRAGMA user_version").fetchone()[0]
        # Called (in trio, not the worker thread) after each commit of :meth:`write`: the
        # event-log service wakes on it to push what the transaction logged.
        self._commit_hooks: list[Callable[[], None]] = []

    @classmethod
    def open_sync(cls, path: Path) -> Database:
        """Open (creating and migrating as needed). Blocking: for CLI commands and threads.

        The state directory is made 0700 and the database file 0600 before SQLite opens it:
        SQLite gives its -wal and -shm files the database file's mode, and the database holds
        orders and the store's settings (systemd's StateDirectory= does the same for the
        unit; a run outside systemd must not rely on the caller's umask)."""
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_uid == os.geteuid():
                    os.fchmod(fd, 0o600)  # a file made before, under a looser umask
            finally:
                os.close(fd)
        except OSError as exc:
            raise StorageError(f"cannot create database {path}: {exc.strerror or exc}") from exc
        writer = connect(path)
        try:
            migrate(writer)
        except Exception:
            writer.close()
            raise
        readers = [connect(path, readonly=True) for _ in range(READERS)]
        return cls(path, writer, readers)

    @classmethod
    async def open(cls, path: Path) -> Database:
        return await trio.to_thread.run_sync(cls.open_sync, path)

    def write_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one committed transaction. Blocking; callers serialise themselves."""
        conn = self._writer
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
        except BaseException:
            conn.rollback()
            raise
        conn.commit()
        return result

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` in a worker thread inside one transaction, committed on return."""
        try:
            async with self._write_lock:
                return await trio.to_thread.run_sync(self.write_sync, fn)
        finally:
            # Also after a cancelled wait: the thread may have committed before it returned.
            for hook in self._commit_hooks:
                hook()

    def on_commit(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Call ``hook()`` after every committed :meth:`write`; returns the remover.
        Hooks must be quick and must not raise (they run in the writer's task)."""
        self._commit_hooks.append(hook)
        return lambda: self._commit_hooks.remove(hook)

    def read_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._reader_pick:
            conn = self._readers.pop()
        try:
            # One read transaction so fn sees one consistent snapshot.
            conn.execute("BEGIN")
            try:
                return fn(conn)
            finally:
                conn.rollback()
        finally:
            with self._reader_pick:
                self._readers.append(conn)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` on a read-only connection in a worker thread."""
        async with self._reader_slots:
            return await trio.to_thread.run_sync(self.read_sync, fn)

    def close(self) -> None:
        for conn in [*self._readers, self._writer]:
            conn.close()
        self._readers.clear()
