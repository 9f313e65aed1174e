"""SIGKILL of the real appliance process right after it answered a burst of commands:
every command it answered for is in the outbox after the kill, and the burst shared
commits (group commit) rather than paying one each.

The burst: 40 single-command requests on 40 connections at once, and two requests of 100
commands each (POST /v1/commands). The kill comes as soon as the last answer is in. The
shared commits are counted in the WAL itself, which the kill leaves as it was: the test
empties it (a checkpoint from its own connection) just before the burst.
"""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

import httpx
import pytest
import trio

from benchmarks._disk import wal_frames
from benchmarks.soak import AUTH, start_box

SINGLES = 40
BATCHES = 2
BATCH_SIZE = 100


def outbox_ids(db: Path) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        return {r[0] for r in conn.execute("SELECT id FROM outbox")}
    finally:
        conn.close()


def empty_the_wal(db: Path) -> None:
    conn = sqlite3.connect(db)
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0
    finally:
        conn.close()


@pytest.mark.slow
async def test_a_group_committed_burst_survives_sigkill_right_after_its_answers(tmp_path: Path) -> None:
    # The device's address has nothing listening: its commands stay queued, nothing acks.
    with trio.socket.socket() as closed:
        await closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
    proc, ports, log = await trio.to_thread.run_sync(lambda: start_box(tmp_path, [("kds-1", dead_port)]))
    db = tmp_path / "state" / "appliance.db"
    answered: list[str] = []
    try:
        api = f"http://127.0.0.1:{ports['api']}"
        limits = httpx.Limits(max_connections=SINGLES + BATCHES, max_keepalive_connections=SINGLES + BATCHES)
        async with httpx.AsyncClient(base_url=api, headers=AUTH, timeout=30, limits=limits) as client:
            warm = await client.post("/v1/devices/kds-1/commands", json={"kind": "print", "body": {}, "id": "warm"})
            assert warm.status_code == 201, warm.text
            await trio.to_thread.run_sync(empty_the_wal, db)
            go = trio.Event()

            async def single(n: int) -> None:
                await go.wait()
                r = await client.post("/v1/devices/kds-1/commands",
                                      json={"kind": "print", "body": {"n": n}, "id": f"one-{n}"})
                assert r.status_code == 201, r.text
                answered.append(r.json()["id"])

            async def batch(b: int) -> None:
                await go.wait()
                lines = [{"device_id": "kds-1", "kind": "order.created", "body": {"line": n}, "id": f"b{b}-{n}"}
                         for n in range(BATCH_SIZE)]
                r = await client.post("/v1/commands", json={"commands": lines})
                assert r.status_code == 201, r.text
                answered.extend(c["id"] for c in r.json()["commands"])

            async with trio.open_nursery() as nursery:
                for n in range(SINGLES):
                    nursery.start_soon(single, n)
                for b in range(BATCHES):
                    nursery.start_soon(batch, b)
                await trio.testing.wait_all_tasks_blocked()
                go.set()
            os.kill(proc.pid, signal.SIGKILL)  # right after the last answer
    finally:
        if proc.poll() is None:
            proc.kill()
        await trio.to_thread.run_sync(proc.wait)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    assert len(answered) == SINGLES + BATCHES * BATCH_SIZE
    # Counted before anything opens the database (opening it would recover the WAL).
    wal = wal_frames(db.with_name(db.name + "-wal"))
    assert 0 < wal.commits < SINGLES + BATCHES, wal  # background writes included, and still fewer
    kept = await trio.to_thread.run_sync(outbox_ids, db)
    assert set(answered) <= kept
