"""The one SQLite database: WAL mode, one writer, readers in parallel, all off the event loop.

Every function passed to :meth:`Database.write` runs in a worker thread inside a
``BEGIN IMMEDIATE`` transaction, committed before ``write`` returns: with
``synchronous=FULL`` the data is on disk when the caller goes on to acknowledge it to
anyone. Writers are serialised by a lock (SQLite allows one writer anyway; queuing in
trio is cheaper than busy-waiting in SQLite). Readers use a small pool of connections and
see the last committed state (WAL).

Group commit: writes that arrive while another is committing wait together and then
share one transaction, one commit and so one fsync (up to :data:`GROUP_MAX` of them).
Each runs in its own savepoint, in arrival order: one that raises is rolled back alone
and its caller gets the exception; the others commit. At a low rate every write is its
own group, so nothing waits longer than before; in a burst (a request with many
commands, several requests in the same millisecond) the fsync, which costs far more than
the SQL, is paid once per group (docs/architecture.md, "Storage").

Durability: a write is durable by default (``synchronous=FULL``: the commit waits for
the disk). ``write(fn, durable=False)`` is for what the process can lose to a power cut
and repair by itself (the device channel's sent and acked records: a lost one sends the
command again, and the device dedupes it by id): its transaction commits without
waiting for the disk (``synchronous=NORMAL``; a process crash loses nothing, the WAL is in
the kernel's cache). A group with any durable write is durable, and a durable commit makes
every commit before it durable too (the WAL is one sequence, synced up to its end).

Checkpoints: SQLite copies the WAL back into the database file every
:data:`WAL_CHECKPOINT_PAGES` pages. Left to itself it does so inside the commit that
crosses the threshold, so one caller (at 100 commands/s, an enqueue 2-3 times in 10 s)
waited for the copy and the database file's fsync as well as its own. While
:meth:`Database.run_checkpoints` runs (the box runs it as a service from the start), the
writer does not checkpoint; a connection of its own does, beside the writer, once a commit
leaves the WAL past the threshold (see the method). Without it (command-line tools,
tests) SQLite's own checkpoint stays on.

Slow commits: each COMMIT (the WAL written and, when durable, synced: the disk's share of
a write) is timed in the writer's thread; one taking :data:`SLOW_COMMIT_S` or longer is
counted (``slow_commits``, ``longest_commit_s``) and remembered with its time
(``slow_commit_log``), for ``/metrics`` and ``scripts/bench dispatch``. Every write that
arrives meanwhile waits that long for the writer: when the disk stalls, this is where it
shows (docs/architecture.md, "Loop stalls").

Cancellation: a write that has been taken into a group runs to completion (trio's
``abandon_on_cancel=False``) and its caller gets the result, the cancel taking effect at
its next checkpoint: a cancelled caller never leaves a half-done transaction. A write
cancelled while it still waits is dropped and never runs. A write that raises is rolled
back.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeVar, cast

import attrs
import trio

from appliance.storage.schema import migrate

__all__ = [
    "CHECKPOINT_RETRY_S",
    "DATABASE_FILE",
    "GROUP_MAX",
    "HANDBACK_S",
    "PAGE_SIZE",
    "SLOW_COMMIT_LOG",
    "SLOW_COMMIT_S",
    "WAL_CHECKPOINT_PAGES",
    "WAL_MAX_PAGES",
    "Database",
    "SlowCommit",
    "StorageError",
    "WalState",
    "connect",
    "read_wal_state",
]

log = logging.getLogger(__name__)

# The database's file name inside the state directory (storage.dir).
DATABASE_FILE: Final = "appliance.db"

T = TypeVar("T")

# Readers in parallel: the HTTP listeners' lookups; two cores, so a few is plenty.
READERS: Final = 4
# How long a connection waits on SQLite's own lock (another process, e.g. a CLI command).
BUSY_TIMEOUT_MS: Final = 5000
# SQLite's page, the unit every commit writes to the WAL once per page it touches. A sale
# touches about five pages per commit (its table, their indexes, the upload outbox, the
# event log): 1 KiB pages write a quarter of what SQLite's default 4 KiB do. Measured with
# `scripts/bench writes`: 50 -> 27 KiB per sale, 149 -> 47 KiB per order to three devices
# (docs/architecture.md, "Bytes written"). Reads of the 100k catalog stay index lookups.
PAGE_SIZE: Final = 1024
# Checkpoint once the WAL holds this many pages: 4 MiB of 1 KiB pages, the WAL size of
# SQLite's default (1000 pages of 4 KiB), so a hot page rewritten by many commits reaches
# the database file once per checkpoint rather than four times.
WAL_CHECKPOINT_PAGES: Final = 4096
# The WAL's bound while the background checkpointer runs: past it, a checkpoint holds the
# writer for the pages it has left to copy (see Database.run_checkpoints).
WAL_MAX_PAGES: Final = 2 * WAL_CHECKPOINT_PAGES
# How long a stopping checkpointer waits for the writer to hand its checkpoint back to it.
HANDBACK_S: Final = 10.0
# A checkpoint that could not copy the whole WAL (a reader still on an older snapshot) is
# tried again after this long, not after every commit.
CHECKPOINT_RETRY_S: Final = 0.1
# The most writes one group commit takes: bounds how long one transaction holds the writer
# (256 enqueues are a few ms of SQL) and so how long the last of them waits for its answer.
GROUP_MAX: Final = 256
# A COMMIT this long or longer counts as slow: the loop's own stall threshold
# (appliance/services/loop_lag.py), past what a person notices on a till. A durable commit
# takes 0.3-0.6 ms on a healthy disk (scripts/bench dispatch); a disk that stalls now and
# then (a virtual disk on a busy host: 30-430 ms for one 20 KiB write, measured with the
# kernel's block trace; an SD card erasing) holds every write behind it as long.
SLOW_COMMIT_S: Final = 0.05
# The slow commits remembered with their times (Database.slow_commit_log), newest last.
SLOW_COMMIT_LOG: Final = 64


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
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # a new database only; see _use_page_size
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
            # FULL: a commit survives a power cut, not just a process crash.
            conn.execute("PRAGMA synchronous = FULL")
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open database {path}: {exc}") from exc
    conn.row_factory = sqlite3.Row
    return conn


@attrs.define(eq=False)
class _Write:
    """One caller's write function, waiting for (or taken into) a group commit."""

    fn: Callable[[sqlite3.Connection], Any]
    durable: bool = True
    taken: bool = False  # in a group: it runs (or ran) whatever happens to its caller
    lead: bool = False  # handed the lead: its caller commits the next groups (Database.write)
    # Set once its group is committed, or when it is handed the lead.
    done: trio.Event = attrs.field(factory=trio.Event)
    result: Any = None
    error: BaseException | None = None

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


@attrs.frozen(kw_only=True)
class SlowCommit:
    """One COMMIT that took :data:`SLOW_COMMIT_S` or longer: when it began
    (``time.perf_counter()``), how long it took, whether it waited for the disk (durable),
    and how many writes it committed."""

    at: float
    seconds: float
    durable: bool
    writes: int


@attrs.frozen(kw_only=True)
class WalState:
    """The WAL as its index says: ``frames`` valid frames (pages written since the WAL
    last restarted), of which ``backfilled`` are copied into the database file."""

    frames: int
    backfilled: int


# The wal-index header at the start of the -shm file (https://www.sqlite.org/walformat.html),
# in the machine's byte order: the last valid frame (mxFrame) at byte 16, and after the two
# 48-byte copies of the header, the frames checkpointed (nBackfill) at byte 96. Read to know
# when the WAL is due for a checkpoint: Python's sqlite3 has no sqlite3_wal_hook.
_WAL_INDEX = struct.Struct("=16xI76xI")
_WAL_INDEX_VERSION = struct.Struct("=I")
_WAL_INDEX_VERSION_3007000: Final = 3007000


def read_wal_state(shm_fd: int) -> WalState | None:
    """The WAL's state from the wal-index (the -shm file open as ``shm_fd``); None if the
    index is not one this code knows (then the caller leaves checkpoints to SQLite)."""
    data = os.pread(shm_fd, _WAL_INDEX.size, 0)
    if len(data) < _WAL_INDEX.size or _WAL_INDEX_VERSION.unpack_from(data)[0] != _WAL_INDEX_VERSION_3007000:
        return None
    frames, backfilled = _WAL_INDEX.unpack(data)
    return WalState(frames=frames, backfilled=backfilled)


def _checkpoint_passive(conn: sqlite3.Connection) -> None:
    """Copy what the WAL holds into the database file, without waiting for the writer or
    any reader (SQLite's PASSIVE mode: frames a reader may still need stay in the WAL)."""
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _use_page_size(conn: sqlite3.Connection, path: Path) -> None:
    """Rewrite a database made with another page size (by an earlier version) to
    :data:`PAGE_SIZE`: once, at open, before anyone else reads it (VACUUM is one
    transaction: a crash leaves the old file whole). If another process holds the file
    open the rewrite waits for the next start; the old page size works, it only writes more."""
    if conn.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE:
        return
    try:
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        conn.execute("VACUUM")
    except sqlite3.OperationalError as exc:
        log.warning("database %s keeps its page size for now: %s", path, exc)
    finally:
        conn.execute("PRAGMA journal_mode = WAL")


class Database:
    """The appliance's database. Open with :meth:`open`; close with :meth:`close`."""

    def __init__(self, path: Path, writer: sqlite3.Connection, readers: list[sqlite3.Connection]) -> None:
        self.path = path
        self._writer = writer
        self._write_lock = trio.Lock()  # held by the leader while it commits (and by the checkpointer)
        self._waiting: list[_Write] = []  # writes not yet taken into a group, oldest first
        self._leading = False  # a caller of write() is the leader (see write)
        self._last_group = 0  # how many writes the last group committed
        # Since open, for /metrics: writes run, and the groups (transactions) they ran in.
        self.writes = 0
        self.groups = 0
        self.durable_groups = 0  # the commits that waited for the disk (an fsync each)
        self._synchronous = "FULL"  # the writer connection's setting now (connect sets FULL)
        # Since open, for /metrics and the benchmarks: each COMMIT timed in the writer's
        # thread (see the module's docstring, "Slow commits").
        self.slow_commits = 0
        self.longest_commit_s = 0.0
        # Appended to by the writer's thread: read a copy (``list(db.slow_commit_log)``, one
        # call under the GIL), never iterate it while writes may run.
        self.slow_commit_log: deque[SlowCommit] = deque(maxlen=SLOW_COMMIT_LOG)
        self._clock: Callable[[], float] = time.perf_counter
        self._readers = readers
        self._reader_slots = trio.Semaphore(len(readers))
        self._reader_pick = threading.Lock()
        self.schema_version: int = writer.execute("PRAGMA user_version").fetchone()[0]
        # The background checkpointer's (run_checkpoints): the -shm file, the WAL's state
        # after the last group, the event that wakes the checkpointer, and its rounds.
        self._shm_fd: int | None = None
        self._wal = WalState(frames=0, backfilled=0)
        self._checkpoint_due: trio.Event | None = None
        self.checkpoints = 0
        self.checkpoints_holding_writer = 0
        # The pipe a group's worker thread writes one byte to when it is done (_in_worker_thread).
        self._done_pipe: tuple[int, int] | None = None
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
            _use_page_size(writer, path)
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
        """Run ``fn`` in one durably committed transaction. Blocking; callers serialise themselves."""
        self._use_synchronous("FULL")
        return self._transaction(fn)

    def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._writer
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
        except BaseException:
            conn.rollback()
            raise
        self._commit(writes=1)
        return result

    def _commit(self, *, writes: int) -> None:
        """COMMIT the writer's transaction, timed (see the module's docstring, "Slow
        commits"). In the writer's thread, the write lock held: one at a time."""
        started = self._clock()
        self._writer.commit()
        took = self._clock() - started
        self.longest_commit_s = max(self.longest_commit_s, took)
        if took >= SLOW_COMMIT_S:
            self.slow_commits += 1
            self.slow_commit_log.append(SlowCommit(at=started, seconds=took, durable=self._synchronous == "FULL",
                                                   writes=writes))

    async def write(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> T:
        """Run ``fn(conn)`` in a worker thread inside a transaction, committed on return;
        writes waiting at the same time share the transaction (see the module's docstring).
        ``durable=False``: the commit does not wait for the disk (see the module's docstring).

        One caller at a time is the leader: it takes the write lock and commits the writes
        waiting, oldest first, in groups, until its own is committed; then it hands the lead
        to the oldest write still waiting (whose caller wakes and does the same) or, with
        none, leaves it. Every other caller waits on its own write's event, set when its
        group is committed (or when it is handed the lead): one wake-up each, where passing
        the lock from one caller to the next had woken them in turn, each entering and
        leaving the lock and a shielded scope only to find its write already committed."""
        job = _Write(fn, durable=durable)
        self._waiting.append(job)
        if self._leading:
            try:
                await job.done.wait()
            except trio.Cancelled:
                if not job.taken:
                    self._waiting.remove(job)
                    if job.lead:
                        self._hand_lead()
                    raise
                # Another caller's group took it: it runs to completion; answer as a write
                # cancelled in its thread does (the result now, the cancel at the next checkpoint).
                with trio.CancelScope(shield=True):
                    await job.done.wait()
                return cast(T, job.outcome())
            if job.taken:
                return cast(T, job.outcome())
            # Handed the lead (the oldest write waiting is this one): first as many rounds of
            # the scheduler as the last group had writes, in which their callers answer and
            # the requests those answers prompt arrive to share the next commit, as when the
            # lock passed from caller to caller (16 requests in flight: 71 commits per 1,000
            # commands with the wait, 120 without it, which cost the writer's thread more).
            for _ in range(self._last_group):
                await trio.lowlevel.cancel_shielded_checkpoint()
        else:
            self._leading = True
        try:
            await self._write_lock.acquire()  # free unless the checkpointer holds it
        except trio.Cancelled:
            self._waiting.remove(job)  # never taken: only the leader takes writes
            self._hand_lead()
            raise
        try:
            # Shielded: a group, once taken, is committed and its callers told. Bounded: the
            # groups ahead of ours were in the queue before us (at most len/GROUP_MAX of them).
            with trio.CancelScope(shield=True):
                while not job.taken:
                    group = self._waiting[:GROUP_MAX]
                    del self._waiting[:GROUP_MAX]
                    for taken in group:
                        taken.taken = True
                    self.writes += len(group)
                    self._last_group = len(group)
                    self.groups += 1
                    self.durable_groups += any(taken.durable for taken in group)
                    try:
                        await self._in_worker_thread(partial(self._commit_group, group))
                    finally:
                        for taken in group:
                            taken.done.set()
                        for hook in self._commit_hooks:
                            hook()
                        if self._checkpoint_due is not None and self._wal.frames >= WAL_CHECKPOINT_PAGES:
                            self._checkpoint_due.set()
        finally:
            self._write_lock.release()
            self._hand_lead()
        return cast(T, job.outcome())

    def _hand_lead(self) -> None:
        """The leader leaves: the oldest write waiting, if any, leads next (its caller wakes)."""
        if self._waiting:
            first = self._waiting[0]
            first.lead = True
            first.done.set()
        else:
            self._leading = False

    async def _in_worker_thread(self, fn: Callable[[], None]) -> None:
        """``fn()`` in one of trio's worker threads, the caller waiting uncancellably (as
        ``trio.to_thread.run_sync`` with ``abandon_on_cancel=False``); raises what it raised.
        Lighter than ``to_thread.run_sync`` by two rounds of trio's scheduler per commit
        (docs/architecture.md §7, "The way of one command"): no thread limiter to acquire
        first (the write lock already lets one group at a time in), and the thread wakes the
        waiting task itself by writing to a pipe the task waits on, where trio's way back
        (``run_sync_soon``) wakes a system task that then wakes ours a round later. One
        write at a time (the caller holds the write lock), so each byte is its group's."""
        if self._done_pipe is None:
            self._done_pipe = os.pipe()
            os.set_blocking(self._done_pipe[0], False)
        done_r, done_w = self._done_pipe
        failed: list[BaseException] = []

        def work() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001  (raised again in the waiting task)
                failed.append(exc)
            finally:
                os.write(done_w, b"\0")

        trio.lowlevel.start_thread_soon(work, lambda _: None)
        with trio.CancelScope(shield=True):  # the byte is this group's: wait for it whatever happens
            while True:
                await trio.lowlevel.wait_readable(done_r)
                try:
                    os.read(done_r, 1)
                    break
                except BlockingIOError:
                    continue
        if failed:
            raise failed[0]

    def _commit_group(self, group: list[_Write]) -> None:
        """Run every write of ``group`` in one transaction (each in a savepoint when there
        are several) and commit it once; each write's result or exception is stored on it.
        In the worker thread."""
        try:
            self._run_group(group)
        finally:
            if self._shm_fd is not None:  # the background checkpointer runs: how full is the WAL now?
                try:
                    self._wal = read_wal_state(self._shm_fd) or self._wal
                except OSError as exc:  # the writes are committed: their callers get their results
                    log.warning("database %s: cannot read the WAL index: %s", self.path, exc)

    def _run_group(self, group: list[_Write]) -> None:
        conn = self._writer
        try:
            self._use_synchronous("FULL" if any(job.durable for job in group) else "NORMAL")
        except Exception as exc:  # noqa: BLE001  (nothing ran: every caller gets the error)
            for job in group:
                job.error = exc
            return
        if len(group) == 1:
            job = group[0]
            try:
                job.result = self._transaction(job.fn)
            except Exception as exc:  # noqa: BLE001  (the caller's own exception, raised in its task)
                job.error = exc
            return
        done: list[_Write] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for job in group:
                conn.execute("SAVEPOINT group_write")
                try:
                    job.result = job.fn(conn)
                except Exception as exc:  # noqa: BLE001  (this write alone is undone; its caller gets exc)
                    job.error = exc
                    if not conn.in_transaction:
                        # SQLite rolled the whole transaction back (an I/O error, a full
                        # disk): the writes before this one are gone too; say so to them,
                        # and go on with the rest in a new transaction.
                        for lost in done:
                            lost.error = StorageError(f"the write was rolled back with another one: {exc}")
                        done.clear()
                        conn.execute("BEGIN IMMEDIATE")
                        continue
                    conn.execute("ROLLBACK TO group_write")
                conn.execute("RELEASE group_write")
                if job.error is None:
                    done.append(job)
            self._commit(writes=len(group))
        except BaseException as exc:
            if conn.in_transaction:
                conn.rollback()
            for job in group:
                if job.error is None:
                    job.error = exc if isinstance(exc, Exception) else StorageError(f"the group write stopped: {exc!r}")
            if not isinstance(exc, Exception):
                raise

    def _use_synchronous(self, level: str) -> None:
        """Set the writer's ``synchronous`` for the next transaction (outside any), if it
        changes: a statement of microseconds, against an fsync of milliseconds saved."""
        if level != self._synchronous:
            self._writer.execute(f"PRAGMA synchronous = {level}")
            self._synchronous = level

    async def run_checkpoints(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Checkpoint the WAL beside the writer until cancelled: the writer's own
        checkpoint is off meanwhile (and back on when this returns).

        Once a commit leaves :data:`WAL_CHECKPOINT_PAGES` frames or more in the WAL, a
        connection of its own copies them into the database file (PASSIVE: the writer goes
        on committing, readers go on reading), and again after each later commit until the
        copy is whole when a commit begins: that commit starts the WAL again from its
        beginning (at 100 commands/s, within a round or two). Writes that never pause long
        enough for that (a steady stream of group commits) take the WAL to
        :data:`WAL_MAX_PAGES`; the copy then holds the writer for the last few pages, so the
        WAL stays bounded. A reader still on an older snapshot keeps its frames in the WAL;
        the copy is tried again :data:`CHECKPOINT_RETRY_S` later.

        Cancellation: a copy under way finishes first (a few ms to a few hundred on a slow
        disk); a crash in the middle of one loses nothing (SQLite's own recovery)."""
        conn = await trio.to_thread.run_sync(connect, self.path)
        try:
            with trio.CancelScope(shield=True):
                started = await self._background_checkpoints(True)
            if not started:
                log.warning("database %s: unknown WAL index; SQLite checkpoints in the writer's commits", self.path)
                task_status.started()
                await trio.sleep_forever()
            task_status.started()
            while True:
                due = self._checkpoint_due
                assert due is not None
                await due.wait()
                self._checkpoint_due = trio.Event()
                before = self._wal_state()
                if before is None or before.frames < WAL_CHECKPOINT_PAGES or before.backfilled >= before.frames:
                    continue  # nothing to copy: the next commit starts the WAL again
                if before.frames < WAL_MAX_PAGES:
                    await trio.to_thread.run_sync(_checkpoint_passive, conn)
                else:
                    async with self._write_lock:
                        await trio.to_thread.run_sync(_checkpoint_passive, conn)
                    self.checkpoints_holding_writer += 1
                self.checkpoints += 1
                after = self._wal_state()
                if after is not None and after.frames >= before.frames and after.backfilled <= before.backfilled:
                    await trio.sleep(CHECKPOINT_RETRY_S)  # no progress: a reader holds older frames
        finally:
            # Bounded: it waits for the group committing now (a slow disk's fsync, a snapshot's
            # swap); past the bound the writer keeps its checkpoint off until the next start of
            # this (the WAL is copied when the database closes).
            with trio.move_on_after(HANDBACK_S, shield=True):
                await self._background_checkpoints(False)
            conn.close()

    def _wal_state(self) -> WalState | None:
        return None if self._shm_fd is None else read_wal_state(self._shm_fd)

    async def _background_checkpoints(self, on: bool) -> bool:
        """Turn the writer's own checkpoint off (``on``) or back on, with the writer held
        (so no group reads the -shm descriptor while it opens or closes); False if the WAL
        index is unknown (the writer keeps its own)."""
        async with self._write_lock:
            return await trio.to_thread.run_sync(self._set_background_checkpoints, on)

    def _set_background_checkpoints(self, on: bool) -> bool:
        if self._shm_fd is not None:
            os.close(self._shm_fd)
            self._shm_fd, self._checkpoint_due = None, None
        if on:
            try:
                fd = os.open(f"{self.path}-shm", os.O_RDONLY)
            except OSError:
                return self._set_background_checkpoints(False)
            wal = read_wal_state(fd)
            if wal is None:
                os.close(fd)
                on = False
            else:
                self._shm_fd, self._checkpoint_due, self._wal = fd, trio.Event(), wal
        self._writer.execute(f"PRAGMA wal_autocheckpoint = {0 if on else WAL_CHECKPOINT_PAGES}")
        return on

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

    async def read_small(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` on a read-only connection right here in trio's thread, for a read
        of a few rows by an index (tens of microseconds: a WAL reader never waits for the
        writer), where the hop to a worker thread and back costs more than the read itself
        (the store API's ``GET /v1/products/{sku}``, docs/store-api.md). With every reader
        busy, it waits for one in turn with :meth:`read`'s callers, then reads here all the
        same. (It used to read in a worker thread then; as trio's Semaphore hands a freed
        slot to the first waiter, no later caller found one free while anyone waited, so a
        burst of thread reads under steady load sent every small read after it to a thread
        for as long as the load lasted: 2,060 product reads/s instead of 3,600.)"""
        try:
            self._reader_slots.acquire_nowait()
        except trio.WouldBlock:
            await self._reader_slots.acquire()
        try:
            return self.read_sync(fn)
        finally:
            self._reader_slots.release()

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` on a read-only connection in a worker thread."""
        async with self._reader_slots:
            return await trio.to_thread.run_sync(self.read_sync, fn)

    def close(self) -> None:
        for conn in [*self._readers, self._writer]:
            conn.close()
        self._readers.clear()
        if self._shm_fd is not None:  # a checkpointer whose hand-back was cut short (run_checkpoints)
            os.close(self._shm_fd)
            self._shm_fd, self._checkpoint_due = None, None
        if self._done_pipe is not None:
            for fd in self._done_pipe:
                os.close(fd)
            self._done_pipe = None
