"""WAL checkpoints beside the writer (``Database.run_checkpoints``): no commit runs one while
the checkpointer does, the WAL stays bounded under steady writes and behind a long reader,
and SQLite's own checkpoint is back once it stops."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import trio

from appliance.services.assembly import service_specs
from appliance.storage import Database
from appliance.storage import db as storage_db
from appliance.storage.db import PAGE_SIZE, WAL_CHECKPOINT_PAGES, WAL_MAX_PAGES, WalState, read_wal_state
from appliance.supervisor import open_runtime, supervise_all
from tests.conftest import ConfigFactory
from tests.sync_helpers import wait_until

# Each of the four writers of the steady-writes test makes this many writes: about 40,000
# frames in all, five times the WAL's bound.
WRITES_EACH = 2500
# A row of about this many bytes fills a few pages (overflow pages): the WAL grows fast.
ROW_BYTES = 3000


def put(key: str) -> Callable[[sqlite3.Connection], None]:
    def write(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, os.urandom(ROW_BYTES // 2).hex()))
    return write


def wal_state(db: Database) -> WalState:
    fd = os.open(f"{db.path}-shm", os.O_RDONLY)
    try:
        state = read_wal_state(fd)
    finally:
        os.close(fd)
    assert state is not None
    return state


async def autocheckpoint(db: Database) -> int:
    return int(await db.write(lambda c: c.execute("PRAGMA wal_autocheckpoint").fetchone()[0]))


async def fill_to_the_threshold(db: Database) -> WalState:
    """Write until a commit leaves the WAL at the threshold or past it; the WAL's state
    read right after that commit, before any other task has run."""
    n = 0
    while True:
        await db.write(put(f"k{n % 50}"), durable=False)
        n += 1
        state = wal_state(db)  # no checkpoint between the write's return and this line
        if state.frames >= WAL_CHECKPOINT_PAGES:
            return state


async def test_without_the_checkpointer_the_commit_crossing_the_threshold_checkpoints(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "a.db")
    try:
        assert await autocheckpoint(db) == WAL_CHECKPOINT_PAGES
        crossed = await fill_to_the_threshold(db)
        assert crossed.backfilled == crossed.frames  # SQLite copied the whole WAL inside that commit
    finally:
        db.close()


async def test_with_the_checkpointer_no_commit_checkpoints_and_the_wal_starts_again(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "a.db")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(db.run_checkpoints)
            assert await autocheckpoint(db) == 0
            crossed = await fill_to_the_threshold(db)
            assert crossed.backfilled == 0  # the commit returned without copying anything
            await wait_until(lambda: db.checkpoints >= 1, what="a background checkpoint")
            await wait_until(lambda: wal_state(db).backfilled >= crossed.frames, what="the WAL copied")
            await db.write(put("next"))
            assert wal_state(db).frames < crossed.frames  # that commit started the WAL again
            assert db.checkpoints_holding_writer == 0  # nothing waited for the writer
            nursery.cancel_scope.cancel()
        assert await autocheckpoint(db) == WAL_CHECKPOINT_PAGES  # SQLite's own is back
        assert await db.read(lambda c: c.execute("SELECT count(*) FROM meta WHERE key = 'next'").fetchone()[0]) == 1
    finally:
        db.close()


async def test_the_wal_stays_bounded_under_writes_that_never_pause(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "a.db")
    wal = f"{db.path}-wal"
    most = 0
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(db.run_checkpoints)

            async def writer(n: int) -> None:
                for i in range(WRITES_EACH):
                    await db.write(put(f"w{n}-{i % 20}"), durable=False)

            async with trio.open_nursery() as writers:
                for n in range(4):  # four at once: the writer is never idle
                    writers.start_soon(writer, n)

                async def watch() -> None:
                    nonlocal most
                    while True:
                        most = max(most, wal_state(db).frames)
                        await trio.sleep(0.005)

                nursery.start_soon(watch)
            nursery.cancel_scope.cancel()
        assert db.checkpoints >= 2
        assert db.writes >= 4 * WRITES_EACH
        # Bounded: the bound, plus what the writers added while the last copy beside them ran
        # (commits without an fsync here: far faster than the box's).
        assert most <= 2 * WAL_MAX_PAGES, most
        size = (await trio.Path(wal).stat()).st_size  # the file's high-water mark
        assert size <= 2 * WAL_MAX_PAGES * (PAGE_SIZE + 24) + 32, size
    finally:
        db.close()


async def test_a_long_reader_keeps_its_frames_and_the_wal_is_copied_once_it_ends(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "a.db")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(db.run_checkpoints)
            await db.write(put("before"))
            reader = sqlite3.connect(f"file:{db.path}?mode=ro", uri=True, isolation_level=None)
            reader.execute("BEGIN")
            assert reader.execute("SELECT count(*) FROM meta WHERE key = 'before'").fetchone()[0] == 1
            crossed = await fill_to_the_threshold(db)
            await wait_until(lambda: db.checkpoints >= 1, what="a background checkpoint")
            await db.write(put("more"))
            # The reader's snapshot is older than every frame since: none of them is copied.
            assert wal_state(db).backfilled < crossed.frames
            reader.execute("ROLLBACK")
            reader.close()
            await db.write(put("after the reader"))
            await wait_until(lambda: wal_state(db).backfilled == wal_state(db).frames, timeout_s=10,
                             what="the WAL copied once the reader ended")
            await db.write(put("last"))
            assert wal_state(db).frames < crossed.frames
            nursery.cancel_scope.cancel()
    finally:
        db.close()


async def test_the_box_runs_the_checkpointer_as_a_service(make_config: ConfigFactory) -> None:
    runtime = await open_runtime(make_config())
    try:
        specs = [spec for spec in service_specs(runtime) if spec.name == "storage.checkpoints"]
        assert len(specs) == 1 and not specs[0].core  # without it SQLite checkpoints by itself
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(supervise_all, runtime, specs))
            assert await autocheckpoint(runtime.db) == 0
            text = runtime.metrics.render()
            assert "\nappliance_storage_checkpoints 0" in text
            assert "\nappliance_storage_checkpoints_holding_writer 0" in text
            assert "\nappliance_storage_slow_commits " in text
            assert "\nappliance_storage_longest_commit_seconds " in text
            runtime.stopping.set()
        assert await autocheckpoint(runtime.db) == WAL_CHECKPOINT_PAGES
    finally:
        runtime.db.close()


def open_descriptors_to(path: str) -> int:
    """This process's descriptors open on ``path`` (" (deleted)" once SQLite removed it)."""
    target, count = os.path.realpath(path), 0
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor, closed since
            count += os.readlink(fd).removesuffix(" (deleted)") == target
    return count


async def test_a_stop_that_cannot_get_the_writer_in_time_returns_and_close_lets_go_of_the_index(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage_db, "HANDBACK_S", 0.05)
    db = await Database.open(tmp_path / "a.db")
    shm = f"{db.path}-shm"
    held, release = threading.Event(), threading.Event()

    def slow(conn: sqlite3.Connection) -> None:
        held.set()
        release.wait(10)

    checkpointer, returned = trio.CancelScope(), trio.Event()

    async def checkpoints(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with checkpointer:
            await db.run_checkpoints(task_status=task_status)
        returned.set()

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(checkpoints)
            nursery.start_soon(partial(db.write, slow))
            await trio.to_thread.run_sync(held.wait)  # a commit holds the writer
            checkpointer.cancel()
            with trio.fail_after(5):
                await returned.wait()  # it gave up waiting for the writer after HANDBACK_S
            release.set()
    finally:
        release.set()
        db.close()
    assert open_descriptors_to(shm) == 0


# A process that writes durably with the checkpointer on (a small threshold, so it copies
# every few writes), printing "ok KEY" after each write returns and "copy" as each
# background copy starts.
_WRITER = r"""
import os
import sys
from pathlib import Path
import trio
from appliance.storage import db as dbm
dbm.WAL_CHECKPOINT_PAGES, dbm.WAL_MAX_PAGES = 64, 128
_passive = dbm._checkpoint_passive
def say(line):  # one write(2) a line: the two threads' lines never interleave (print writes its end apart)
    os.write(1, f"{line}\n".encode())
def passive(conn):
    say("copy")
    _passive(conn)
dbm._checkpoint_passive = passive
async def main():
    db = await dbm.Database.open(Path(sys.argv[1]))
    async with trio.open_nursery() as nursery:
        await nursery.start(db.run_checkpoints)
        for i in range(100_000):
            key = f"{sys.argv[2]}-{i}"
            await db.write(lambda c: c.execute("INSERT INTO meta(key, value) VALUES (?, ?)", (key, "x" * 3000)))
            say(f"ok {key}")
trio.run(main)
"""


def test_a_kill_as_a_background_checkpoint_copies_loses_no_acknowledged_write(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    acknowledged: set[str] = set()
    for run in range(4):
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), f"r{run}"], stdout=subprocess.PIPE,
                                  text=True)
        assert writer.stdout is not None
        copies = 0
        for line in writer.stdout:
            if line.startswith("ok "):
                acknowledged.add(line.split()[1])
            elif line == "copy\n":
                copies += 1
                if copies == 3 + run:  # SIGKILL as that copy starts: it lands in the copy or just after
                    writer.kill()
                    break
        writer.wait()
        writer.stdout.close()
        assert copies == 3 + run
        conn = sqlite3.connect(path)  # SQLite's recovery, as the next start of the box
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            keys = {r[0] for r in conn.execute("SELECT key FROM meta WHERE key LIKE 'r%'")}
        finally:
            conn.close()
        assert acknowledged <= keys, sorted(acknowledged - keys)[:5]
    assert len(acknowledged) > 40


def test_an_unknown_wal_index_is_refused(tmp_path: Path) -> None:
    shm = tmp_path / "x-shm"
    shm.write_bytes(bytes(136))  # version 0: not SQLite's 3007000
    fd = os.open(shm, os.O_RDONLY)
    try:
        assert read_wal_state(fd) is None
    finally:
        os.close(fd)
    shm.write_bytes(b"\x01")  # too short
    fd = os.open(shm, os.O_RDONLY)
    try:
        assert read_wal_state(fd) is None
    finally:
        os.close(fd)
