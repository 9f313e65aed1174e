"""The durable outbox on a real SQLite file: seqs, idempotency, atomicity with the caller's
transaction, state changes, expiry, pruning, backlog figures, and bad input refused with
nothing written."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.protocol.channel import Acked, Dead, Sent
from appliance.storage import Database, connect
from appliance.storage.event_log import command_changed
from appliance.storage.outbox import (
    CommandIdTaken,
    CommandState,
    OutboxError,
    apply_records,
    backlogs,
    enqueue_in,
    expire_due,
    get_command,
    last_seqs,
    list_commands,
    load_unsettled,
    prune_settled,
)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database.open_sync(tmp_path / "appliance.db")
    yield database
    database.close()


def count(db: Database) -> int:
    return db.read_sync(lambda c: c.execute("SELECT count(*) FROM outbox").fetchone()[0])  # type: ignore[no-any-return]


def test_seqs_rise_by_one_per_device_and_commit_before_return(db: Database, tmp_path: Path) -> None:
    made = [db.write_sync(partial(enqueue_in, device_id=d, kind="print", body={"n": i}, now=100.0 + i))
            for i, d in enumerate(["a", "b", "a", "a", "b"])]
    assert [(m.device_id, m.seq) for m in made] == [("a", 1), ("b", 1), ("a", 2), ("a", 3), ("b", 2)]
    assert all(m.created and m.id.startswith("c-") for m in made)
    assert len({m.id for m in made}) == 5
    # Another connection (another process, after a crash) sees every one.
    other = connect(tmp_path / "appliance.db", readonly=True)
    try:
        rows = other.execute("SELECT device_id, seq, state, body FROM outbox ORDER BY created_at").fetchall()
    finally:
        other.close()
    assert [(r["device_id"], r["seq"], r["state"]) for r in rows] == [
        ("a", 1, "queued"), ("b", 1, "queued"), ("a", 2, "queued"), ("a", 3, "queued"), ("b", 2, "queued")]
    assert json.loads(rows[0]["body"]) == {"n": 0}
    assert db.read_sync(last_seqs) == {"a": 3, "b": 2}


def test_enqueue_in_is_atomic_with_the_callers_other_writes(db: Database) -> None:
    class OrderRejected(Exception):
        pass

    def order_and_commands(conn: sqlite3.Connection, fail: bool) -> None:
        conn.execute("INSERT INTO meta (key, value) VALUES ('order-1', 'received')")
        enqueue_in(conn, "kds-1", "order.created", {"order": 1})
        enqueue_in(conn, "printer-1", "print", {"order": 1})
        if fail:
            raise OrderRejected("the order cannot be stored")

    with pytest.raises(OrderRejected):
        db.write_sync(partial(order_and_commands, fail=True))
    assert count(db) == 0 and db.read_sync(last_seqs) == {}
    assert db.read_sync(lambda c: c.execute("SELECT count(*) FROM meta WHERE key = 'order-1'").fetchone()[0]) == 0
    db.write_sync(partial(order_and_commands, fail=False))
    assert count(db) == 2 and db.read_sync(last_seqs) == {"kds-1": 1, "printer-1": 1}


def test_a_client_made_id_makes_enqueue_idempotent(db: Database) -> None:
    first = db.write_sync(partial(enqueue_in, device_id="a", kind="print", body={}, command_id="pos-17:receipt"))
    again = db.write_sync(partial(enqueue_in, device_id="a", kind="print", body={"other": 1},
                                  command_id="pos-17:receipt"))
    assert first.created and not again.created and (again.id, again.seq) == (first.id, first.seq)
    assert count(db) == 1
    with pytest.raises(CommandIdTaken, match="already used for device 'a'"):
        db.write_sync(partial(enqueue_in, device_id="b", kind="print", body={}, command_id="pos-17:receipt"))
    assert count(db) == 1


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"kind": "Order Created"}, "dotted lower-case name"),
    ({"kind": ""}, "dotted lower-case name"),
    ({"body": [1, 2]}, "a command body is a JSON object"),
    ({"body": {"x": float("inf")}}, "plain JSON"),
    ({"body": {"x": "y" * 70_000}}, "at most"),
    ({"expires_at": float("nan")}, "finite number"),
    ({"expires_at": True}, "finite number"),
    ({"command_id": "has space"}, "command id"),
    ({"device_id": ""}, "needs a device id"),
])
def test_bad_commands_are_refused_and_nothing_is_written(db: Database, kwargs: dict[str, Any], words: str) -> None:
    args: dict[str, Any] = {"device_id": "a", "kind": "print", "body": {}, **kwargs}
    with pytest.raises(OutboxError, match=words):
        db.write_sync(partial(enqueue_in, **args))
    assert count(db) == 0 and db.read_sync(last_seqs) == {}


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(body=st.dictionaries(st.text(max_size=10), st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10), max_size=4))
def test_any_body_is_stored_exactly_or_refused(db: Database, body: dict[str, Any]) -> None:
    before = count(db)
    try:
        made = db.write_sync(partial(enqueue_in, device_id="h", kind="display", body=body))
    except OutboxError:
        assert count(db) == before
        return
    row = db.read_sync(partial(get_command, command_id=made.id))
    assert row is not None and json.loads(row.body) == body


_ORDER_IDS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6) | st.lists(
    st.integers(), max_size=2) | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)


@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(body=st.one_of(
    st.dictionaries(st.sampled_from(["n", "line", "x"]), st.integers(), max_size=2),
    st.fixed_dictionaries({"order": st.fixed_dictionaries({"order_id": _ORDER_IDS})}),
    st.fixed_dictionaries({"order": st.dictionaries(st.sampled_from(["order_id", "id", "lines"]), _ORDER_IDS,
                                                    max_size=2)}),
    st.fixed_dictionaries({"order": _ORDER_IDS, "n": st.integers()})))
def test_the_queued_event_is_what_reading_the_command_back_logs(db: Database, body: dict[str, Any]) -> None:
    """An enqueue logs command.queued from what it stored, without reading the row back:
    the event is the one read back from the row would be (order id included, in whatever
    JSON form a body gives it)."""

    def both(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
        made = enqueue_in(conn, "d", "print", body, now=5.0)
        command_changed(conn, "command.queued", made.id, now=5.0)
        return [tuple(r) for r in conn.execute(
            "SELECT topic, type, device_id, subject, typeof(subject), at, body FROM event_log "
            "ORDER BY id DESC LIMIT 2")]

    try:
        read_back, queued = db.write_sync(both)
    except OutboxError:
        return
    assert queued == read_back


def test_records_move_states_forward_only(db: Database) -> None:
    ids = [db.write_sync(partial(enqueue_in, device_id="a", kind="print", body={}, now=1.0)).id for _ in range(4)]
    db.write_sync(partial(apply_records, records=[
        Sent(id=ids[0], seq=1, at=10), Sent(id=ids[0], seq=1, at=11), Sent(id=ids[1], seq=2, at=12),
        Acked(id=ids[0], seq=1, at=13), Dead(id=ids[2], seq=3, reason="expired before it could be delivered", at=14),
        Sent(id=ids[0], seq=1, at=15),  # a late record never moves an acked command back
        Dead(id=ids[0], seq=1, reason="x", at=16),  # nor kills it
    ]))
    rows = {r.id: r for r in db.read_sync(partial(list_commands, device_id="a"))}
    assert (rows[ids[0]].state, rows[ids[0]].attempts, rows[ids[0]].settled_at) == (CommandState.ACKED, 2, 13)
    assert (rows[ids[1]].state, rows[ids[1]].attempts, rows[ids[1]].sent_at) == (CommandState.SENT, 1, 12)
    assert (rows[ids[2]].state, rows[ids[2]].reason) == (CommandState.DEAD, "expired before it could be delivered")
    assert rows[ids[3]].state is CommandState.QUEUED
    # A late ack wins over dead: the device has the command.
    db.write_sync(partial(apply_records, records=[Acked(id=ids[2], seq=3, at=20)]))
    row = db.read_sync(partial(get_command, command_id=ids[2]))
    assert row is not None and (row.state, row.reason) == (CommandState.ACKED, "")
    assert [r.seq for r in db.read_sync(partial(list_commands, device_id="a", state=CommandState.QUEUED))] == [4]


def test_loading_skips_settled_gaps_and_says_where_to_go_on(db: Database) -> None:
    ids = [db.write_sync(partial(enqueue_in, device_id="a", kind="print", body={"n": n})).id for n in range(1, 7)]
    db.write_sync(partial(enqueue_in, device_id="b", kind="print", body={}))
    db.write_sync(partial(apply_records, records=[Acked(id=ids[1], seq=2, at=1), Acked(id=ids[2], seq=3, at=1)]))
    commands, cursor = db.read_sync(partial(load_unsettled, device_id="a", after_seq=0, limit=2))
    assert [c.seq for c in commands] == [1, 4] and cursor == 4
    commands, cursor = db.read_sync(partial(load_unsettled, device_id="a", after_seq=4, limit=10))
    assert [c.seq for c in commands] == [5, 6] and cursor == 6
    assert json.loads(commands[0].body) == {"n": 5}
    db.write_sync(partial(apply_records, records=[Dead(id=ids[5], seq=6, reason="r", at=1)]))
    assert db.read_sync(partial(load_unsettled, device_id="a", after_seq=5, limit=10)) == ([], 6)
    assert db.read_sync(partial(load_unsettled, device_id="nobody", after_seq=0, limit=10)) == ([], 0)


def test_expiry_sweep_pruning_and_seqs_that_never_come_back(db: Database) -> None:
    a1 = db.write_sync(partial(enqueue_in, device_id="a", kind="print", body={}, expires_at=50.0, now=1.0))
    a2 = db.write_sync(partial(enqueue_in, device_id="a", kind="print", body={}, expires_at=500.0, now=2.0))
    a3 = db.write_sync(partial(enqueue_in, device_id="a", kind="print", body={}, now=3.0))
    assert db.write_sync(partial(expire_due, now=100.0)) == 1
    assert db.read_sync(partial(get_command, command_id=a1.id)).state is CommandState.DEAD  # type: ignore[union-attr]
    db.write_sync(partial(apply_records, records=[Acked(id=a2.id, seq=2, at=120.0), Acked(id=a3.id, seq=3, at=300)]))
    # Settled before 200: the dead one (at 100) and the first ack (at 120); not the ack at 300.
    assert db.write_sync(partial(prune_settled, before=200.0)) == 2
    assert [r.id for r in db.read_sync(partial(list_commands, device_id="a"))] == [a3.id]
    assert db.write_sync(partial(prune_settled, before=400.0)) == 1
    assert db.write_sync(partial(enqueue_in, device_id="a", kind="print", body={})).seq == 4


def test_backlogs_give_depth_and_oldest_times(db: Database) -> None:
    a = [db.write_sync(partial(enqueue_in, device_id="a", kind="print", body={}, now=float(t))) for t in (10, 20, 30)]
    db.write_sync(partial(enqueue_in, device_id="b", kind="print", body={}, now=40.0))
    db.write_sync(partial(apply_records, records=[Sent(id=a[0].id, seq=1, at=11), Acked(id=a[1].id, seq=2, at=21)]))
    got = {b.device_id: b for b in db.read_sync(backlogs)}
    assert (got["a"].depth, got["a"].unsent, got["a"].oldest_created_at, got["a"].oldest_unsent_at) == (2, 1, 10, 30)
    assert (got["b"].depth, got["b"].unsent, got["b"].oldest_unsent_at) == (1, 1, 40)
    assert db.read_sync(partial(list_commands, device_id="a", limit=10_000))[0].seq == 3  # newest first, capped
