"""Storage: WAL and durability settings, migrations, one box id for life, refusing a newer schema."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from appliance.storage import Database, SchemaError, migrate
from appliance.storage.db import PAGE_SIZE, SLOW_COMMIT_S, WAL_CHECKPOINT_PAGES, SlowCommit
from appliance.storage.meta import appliance_id
from appliance.storage.schema import Migration, load_migrations
from appliance.storage.secrets import load_or_create_token, write_secret


async def test_open_sets_wal_full_sync_and_latest_schema(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "a.db")
    try:
        mode = await db.read(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0])
        sync = await db.write(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])
        assert mode == "wal"
        assert sync == 2  # FULL: a commit survives a power cut
        assert db.schema_version == load_migrations()[-1].version
    finally:
        db.close()


def test_migrations_are_numbered_from_one_without_gaps() -> None:
    versions = [m.version for m in load_migrations()]
    assert versions == list(range(1, len(versions) + 1))


async def test_appliance_id_is_made_once(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "a.db")
    first = await db.write(appliance_id)
    db.close()
    db = await Database.open(tmp_path / "a.db")
    try:
        assert await db.write(appliance_id) == first
    finally:
        db.close()


async def test_a_failed_write_is_rolled_back(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "a.db")

    def half(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO meta(key, value) VALUES ('a', '1')")
        raise ValueError("boom")

    try:
        with pytest.raises(ValueError, match="boom"):
            await db.write(half)
        assert await db.read(lambda c: c.execute("SELECT count(*) FROM meta WHERE key='a'").fetchone()[0]) == 0
    finally:
        db.close()


async def test_cancelled_caller_never_leaves_half_a_transaction(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "a.db")
    started = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def slow(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO meta(key, value) VALUES ('slow', '1')")
        trio.from_thread.run_sync(started.set, trio_token=token)
        conn.execute("INSERT INTO meta(key, value) VALUES ('slow2', '2')")

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(db.write, slow)
            await started.wait()
            nursery.cancel_scope.cancel()
        rows = await db.read(lambda c: c.execute("SELECT key FROM meta WHERE key LIKE 'slow%'").fetchall())
        assert sorted(r[0] for r in rows) == ["slow", "slow2"]  # the thread finished the whole transaction
    finally:
        db.close()


def test_migration_failure_leaves_previous_version(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    good = Migration(version=1, name="one", sql="CREATE TABLE t (x INTEGER);")
    bad = Migration(version=2, name="two", sql="CREATE TABLE u (y INTEGER); THIS IS NOT SQL;")
    with pytest.raises(SchemaError, match="0002_two failed"):
        migrate(conn, (good, bad))
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name='u'").fetchone()[0] == 0
    conn.close()


def test_newer_database_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "n.db", isolation_level=None)
    conn.execute("PRAGMA user_version = 999")
    with pytest.raises(SchemaError, match="newer than this firmware"):
        migrate(conn)
    conn.close()


def test_secret_files_are_0600_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "admin.token"
    token = load_or_create_token(path)
    assert len(token) >= 40
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert load_or_create_token(path) == token
    write_secret(path, "other")
    assert path.read_text() == "other" and os.stat(path).st_mode & 0o777 == 0o600


def test_many_concurrent_secret_saves_all_succeed_and_leave_one_complete_file(tmp_path: Path) -> None:
    # Two pairing saves once raced on one fixed temporary name: the second rename found
    # nothing to rename and the demo crashed. Every save must succeed, whatever the overlap.
    path = tmp_path / "pairing.json"
    payloads = [json.dumps({"writer": n, "pad": "x" * 20_000}) for n in range(16)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(payloads))

    def save(data: str) -> None:
        start.wait()
        try:
            for _ in range(20):
                write_secret(path, data)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(data,)) for data in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert path.read_text() in payloads  # one writer's whole file, never a mix or a cut
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairing.json"]  # no temporary left behind


async def test_database_and_its_wal_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)  # what a login shell usually has: files 0644, directories 0755
    try:
        db = await Database.open(tmp_path / "state" / "appliance.db")
    finally:
        os.umask(old)
    try:
        await db.write(lambda conn: conn.execute("CREATE TABLE IF NOT EXISTS t (x)"))
        files = sorted((tmp_path / "state").iterdir())
        assert {f.name for f in files} >= {"appliance.db", "appliance.db-wal"}
        assert {f.name: os.stat(f).st_mode & 0o777 for f in files} == dict.fromkeys((f.name for f in files), 0o600)
        assert os.stat(tmp_path / "state").st_mode & 0o777 == 0o700
    finally:
        db.close()


# --- group commit --------------------------------------------------------------------


async def _hold_writer(db: Database, nursery: trio.Nursery) -> threading.Event:
    """Start a write that blocks in its thread until the returned event is set: writes made
    meanwhile queue up behind it, as they do behind a slow fsync."""
    release, inside = threading.Event(), trio.Event()
    token = trio.lowlevel.current_trio_token()

    def hold(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('hold', '1')")
        trio.from_thread.run_sync(inside.set, trio_token=token)
        release.wait(10)

    nursery.start_soon(db.write, hold)
    await inside.wait()
    return release


async def test_writes_waiting_together_share_one_commit_in_arrival_order(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "a.db")
    commits: list[int] = []
    db.on_commit(lambda: commits.append(1))
    results: dict[int, int] = {}

    def put(conn: sqlite3.Connection, n: int) -> int:
        conn.execute("INSERT INTO meta(key, value) VALUES (?, ?)", (f"k{n}", str(n)))
        # What the writes before it in the group left: they ran first, in the same transaction.
        return int(conn.execute("SELECT count(*) FROM meta WHERE key LIKE 'k%'").fetchone()[0])

    async def one(n: int) -> None:
        results[n] = await db.write(lambda conn: put(conn, n))

    try:
        async with trio.open_nursery() as nursery:
            release = await _hold_writer(db, nursery)
            for n in range(20):
                nursery.start_soon(one, n)
                await trio.testing.wait_all_tasks_blocked()  # queued in this order
            release.set()
        assert len(commits) == 2  # the held write, then the other twenty together
        assert results == {n: n + 1 for n in range(20)}
        assert await db.read(lambda c: c.execute("SELECT count(*) FROM meta WHERE key LIKE 'k%'").fetchone()[0]) == 20
    finally:
        db.close()


def _synchronous(conn: sqlite3.Connection) -> int:
    """The writer's setting inside the write's own transaction: 2 FULL (the commit waits
    for the disk), 1 NORMAL (it does not)."""
    return int(conn.execute("PRAGMA synchronous").fetchone()[0])


async def test_a_write_not_durable_skips_the_fsync_unless_it_shares_a_commit_with_a_durable_one(
        tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "a.db")
    try:
        assert await db.write(_synchronous, durable=False) == 1
        assert await db.write(_synchronous) == 2  # the default: durable
        assert await db.write(_synchronous, durable=False) == 1
        assert await trio.to_thread.run_sync(db.write_sync, _synchronous) == 2  # always durable
        assert (db.groups, db.durable_groups) == (3, 1)  # write_sync is the caller's own, not counted

        seen: dict[str, int] = {}

        async def one(name: str, durable: bool) -> None:
            seen[name] = await db.write(_synchronous, durable=durable)

        for durables in ((False, False), (False, True)):
            async with trio.open_nursery() as nursery:
                release = await _hold_writer(db, nursery)
                for n, durable in enumerate(durables):
                    nursery.start_soon(one, f"{durables}{n}", durable)
                    await trio.testing.wait_all_tasks_blocked()
                release.set()
        # Two not durable together: no fsync. One durable among them: the whole group waits for the disk.
        assert seen == {"(False, False)0": 1, "(False, False)1": 1, "(False, True)0": 2, "(False, True)1": 2}
        assert (db.groups, db.durable_groups) == (7, 4)  # + two held writes (durable) and the two groups
    finally:
        db.close()


async def test_slow_commits_are_counted_and_remembered_with_their_time(tmp_path: Path) -> None:
    """The COMMIT alone is timed (the disk's share), in the writer's thread: a clock read
    just before and after it, scripted here commit by commit."""
    db = await Database.open(tmp_path / "a.db")
    # (start, end) of each COMMIT in turn: slow, fast, fast (the held write), slow (the group).
    readings = iter([100.0, 100.0 + 4 * SLOW_COMMIT_S, 101.0, 101.001, 102.0, 102.01, 103.0, 103.0 + 2 * SLOW_COMMIT_S])
    db._clock = lambda: next(readings)

    def slow_sql(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('x', '1')")

    try:
        await db.write(slow_sql)
        await db.write(slow_sql, durable=False)
        async with trio.open_nursery() as nursery:
            release = await _hold_writer(db, nursery)
            for _ in range(3):
                nursery.start_soon(partial(db.write, slow_sql, durable=False))
                await trio.testing.wait_all_tasks_blocked()
            release.set()
        assert next(readings, None) is None and db.groups == 4
        assert db.slow_commits == 2
        assert db.longest_commit_s == pytest.approx(4 * SLOW_COMMIT_S)
        assert list(db.slow_commit_log) == [
            SlowCommit(at=100.0, seconds=pytest.approx(4 * SLOW_COMMIT_S), durable=True, writes=1),
            SlowCommit(at=103.0, seconds=pytest.approx(2 * SLOW_COMMIT_S), durable=False, writes=3)]
    finally:
        db.close()


async def test_a_failing_write_in_a_group_is_undone_alone(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "a.db")
    outcomes: dict[str, object] = {}

    def put(conn: sqlite3.Connection, key: str) -> str:
        conn.execute("INSERT INTO meta(key, value) VALUES (?, '1')", (key,))
        if key == "bad":
            raise ValueError("bad write")
        return key

    async def one(key: str) -> None:
        try:
            outcomes[key] = await db.write(lambda conn: put(conn, key))
        except ValueError as exc:
            outcomes[key] = exc

    try:
        async with trio.open_nursery() as nursery:
            release = await _hold_writer(db, nursery)
            for key in ("a", "bad", "b"):
                nursery.start_soon(one, key)
                await trio.testing.wait_all_tasks_blocked()
            release.set()
        assert outcomes["a"] == "a" and outcomes["b"] == "b"
        assert isinstance(outcomes["bad"], ValueError)
        keys = await db.read(lambda c: [r[0] for r in c.execute("SELECT key FROM meta WHERE key IN ('a', 'b', 'bad')")])
        assert sorted(keys) == ["a", "b"]
    finally:
        db.close()


async def test_a_write_cancelled_while_waiting_never_runs(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "a.db")
    try:
        async with trio.open_nursery() as nursery:
            release = await _hold_writer(db, nursery)
            with trio.CancelScope() as scope:
                nursery.start_soon(lambda: db.write(lambda c: c.execute("INSERT INTO meta VALUES ('later', '1')")))
                await trio.testing.wait_all_tasks_blocked()
                waiting = trio.CancelScope()

                async def cancelled() -> None:
                    with waiting:
                        await db.write(lambda c: c.execute("INSERT INTO meta VALUES ('never', '1')"))

                nursery.start_soon(cancelled)
                await trio.testing.wait_all_tasks_blocked()
                waiting.cancel()
                await trio.testing.wait_all_tasks_blocked()
            assert not scope.cancelled_caught
            release.set()
        keys = await db.read(lambda c: sorted(r[0] for r in c.execute("SELECT key FROM meta WHERE key IN "
                                                                      "('hold', 'later', 'never')")))
        assert keys == ["hold", "later"]
    finally:
        db.close()


async def test_a_write_taken_into_a_group_completes_for_a_cancelled_caller(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "a.db")
    release, inside = threading.Event(), trio.Event()
    token = trio.lowlevel.current_trio_token()
    got: list[str] = []

    def slow(conn: sqlite3.Connection) -> str:
        conn.execute("INSERT INTO meta VALUES ('first', '1')")
        trio.from_thread.run_sync(inside.set, trio_token=token)
        release.wait(10)
        return "first"

    def second(conn: sqlite3.Connection) -> str:
        conn.execute("INSERT INTO meta VALUES ('second', '1')")
        return "second"

    async def follower(scope: trio.CancelScope) -> None:
        with scope:
            got.append(await db.write(second))

    try:
        async with trio.open_nursery() as nursery:
            held = await _hold_writer(db, nursery)
            # Two writes queue behind it; the first to get the lock takes both into its group.
            nursery.start_soon(db.write, slow)
            await trio.testing.wait_all_tasks_blocked()
            scope = trio.CancelScope()
            nursery.start_soon(follower, scope)
            await trio.testing.wait_all_tasks_blocked()
            held.set()
            await inside.wait()  # the group (slow, second) is in its thread now
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            release.set()
        assert got == ["second"]  # the cancelled caller still got its committed result
        keys = await db.read(lambda c: sorted(r[0] for r in c.execute("SELECT key FROM meta WHERE key IN "
                                                                      "('first', 'second')")))
        assert keys == ["first", "second"]
    finally:
        db.close()


async def test_a_write_handed_the_lead_but_cancelled_passes_it_on(tmp_path: Path) -> None:
    """Group commit's lead (docs/architecture.md §4): when the leader's own write is
    committed it hands the lead to the oldest write waiting. If that write's caller is
    cancelled at that very moment, it must pass the lead on, else every write after it
    waits forever."""
    db = await Database.open(tmp_path / "a.db")
    got: list[str] = []
    b_scope = trio.CancelScope()

    def cancel_b_once() -> None:
        if not b_scope.cancel_called:
            b_scope.cancel()  # after the holder's group, before the lead reaches B

    def put(key: str) -> Callable[[sqlite3.Connection], str]:
        def write(conn: sqlite3.Connection) -> str:
            conn.execute("INSERT INTO meta VALUES (?, '1')", (key,))
            return key
        return write

    async def b() -> None:
        with b_scope:
            got.append(await db.write(put("b")))

    async def c() -> None:
        got.append(await db.write(put("c")))

    try:
        with trio.fail_after(10):  # a lead lost is a hang: fail instead
            async with trio.open_nursery() as nursery:
                release = await _hold_writer(db, nursery)
                nursery.start_soon(b)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(c)
                await trio.testing.wait_all_tasks_blocked()
                db.on_commit(cancel_b_once)
                release.set()
            got.append(await db.write(put("d")))
        assert b_scope.cancelled_caught
        assert got == ["c", "d"]
        keys = await db.read(lambda c: sorted(r[0] for r in c.execute("SELECT key FROM meta WHERE key IN "
                                                                      "('b', 'c', 'd')")))
        assert keys == ["c", "d"]
    finally:
        db.close()


class TaskSteps(trio.abc.Instrument):
    """Every step of every task, in order, while installed."""

    def __init__(self) -> None:
        self.tasks: list[trio.lowlevel.Task] = []

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.tasks.append(task)


async def test_a_lone_write_resumes_its_caller_twice_and_wakes_no_other_task(tmp_path: Path) -> None:
    """A write's way to its worker thread and back: one round of the scheduler for the write
    lock (where writes arriving together gather into one group) and one when its thread is
    done, which wakes the caller itself (docs/architecture.md §7, "The way of one command").
    trio.to_thread.run_sync took two more: its thread limiter's, and a system task's that
    passed the result on."""
    db = await Database.open(tmp_path / "a.db")
    me = trio.lowlevel.current_task()

    def touch(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('touch', '1')")

    try:
        await db.write(touch)
        steps = TaskSteps()
        trio.lowlevel.add_instrument(steps)
        try:
            await db.write(touch)
        finally:
            trio.lowlevel.remove_instrument(steps)
        assert steps.tasks == [me, me]
    finally:
        db.close()


class GroupStopped(BaseException):
    """Not an Exception: raised by a whole group, not by one of its writes."""


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_what_a_groups_thread_raises_reaches_its_caller_and_the_writer_goes_on(tmp_path: Path) -> None:
    """What the group's thread raises outside any one write is raised in the caller's task;
    the next write runs as usual, and closing lets go of every descriptor the writer opened
    (the pipe its threads wake the caller through)."""
    before = open_descriptors()
    db = await Database.open(tmp_path / "a.db")
    try:
        await db.write(lambda c: c.execute("INSERT INTO meta VALUES ('a', '1')"))
        real = db._commit_group

        def broken(group: list[object]) -> None:
            raise GroupStopped

        db._commit_group = broken  # type: ignore[method-assign, assignment]
        with pytest.raises(GroupStopped):
            await db.write(lambda c: c.execute("INSERT INTO meta VALUES ('b', '1')"))
        db._commit_group = real  # type: ignore[method-assign]
        await db.write(lambda c: c.execute("INSERT INTO meta VALUES ('c', '1')"))
        keys = await db.read(lambda c: sorted(r[0] for r in c.execute("SELECT key FROM meta WHERE key IN "
                                                                      "('a', 'b', 'c')")))
        assert keys == ["a", "c"]
    finally:
        db.close()
    assert open_descriptors() == before


# --- page size ------------------------------------------------------------------------


async def test_a_new_database_has_small_pages_and_the_checkpoint_policy(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "a.db")
    try:
        assert await db.read(lambda c: c.execute("PRAGMA page_size").fetchone()[0]) == PAGE_SIZE
        assert await db.write(lambda c: c.execute("PRAGMA wal_autocheckpoint").fetchone()[0]) == WAL_CHECKPOINT_PAGES
    finally:
        db.close()


def test_a_database_with_the_old_page_size_is_rewritten_once_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    old = sqlite3.connect(path)
    old.execute("PRAGMA page_size = 4096")
    old.execute("PRAGMA journal_mode = WAL")
    migrate(old)
    old.execute("INSERT INTO meta(key, value) VALUES ('kept', 'yes')")
    old.commit()
    assert old.execute("PRAGMA page_size").fetchone()[0] == 4096
    old.close()
    db = Database.open_sync(path)
    try:
        assert db.read_sync(lambda c: c.execute("PRAGMA page_size").fetchone()[0]) == PAGE_SIZE
        assert db.read_sync(lambda c: c.execute("SELECT value FROM meta WHERE key = 'kept'").fetchone()[0]) == "yes"
        assert db.write_sync(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0]) == "wal"
    finally:
        db.close()


async def test_small_reads_queued_behind_thread_reads_run_in_trios_thread(tmp_path: Path) -> None:
    """Small reads that find every reader busy wait their turn, then read in trio's thread: a
    queue formed by a burst of worker-thread reads drains at the small reads' speed instead
    of sending each later one to a worker thread as well."""
    db = await Database.open(tmp_path / "a.db")
    release = threading.Event()
    threads: list[str] = []

    def slow(conn: sqlite3.Connection) -> None:
        release.wait(10)

    def small(conn: sqlite3.Connection) -> int:
        threads.append(threading.current_thread().name)
        return int(conn.execute("SELECT 1").fetchone()[0])

    async with trio.open_nursery() as nursery:
        for _ in range(len(db._readers) + 2):  # every reader busy, and two more thread reads waiting
            nursery.start_soon(db.read, slow)
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        for _ in range(5):
            nursery.start_soon(db.read_small, small)
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert threads == []  # all waiting for a reader
        release.set()
    assert threads == [threading.main_thread().name] * 5
    db.close()
