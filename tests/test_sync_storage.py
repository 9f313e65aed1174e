"""The replica, the cursor and the events outbox in a real SQLite file (storage/catalog.py,
storage/events.py, storage/pairing.py, migration 0004)."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import stat
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.protocol.sync import batch_key
from appliance.storage import Database
from appliance.storage.catalog import (
    STAGE_ROWS_PER_STATEMENT,
    BadPageToken,
    ReplicaWrite,
    apply_changes,
    begin_snapshot,
    decode_after,
    drop_old_replica,
    encode_after,
    finish_snapshot,
    get_item,
    name_key,
    replica_counts,
    require_snapshot,
    search_products,
    set_store,
    stage_rows,
    sync_state,
)
from appliance.storage.events import (
    OutboxEvent,
    Received,
    claim_batch,
    enqueue,
    outbox_stats,
    prune_accepted,
    receive,
    reject_batch,
    release_batch,
    settle_batch,
    upload_state,
)
from appliance.storage.pairing import PAIRING_FILE, PairingFileError, StoreLink, load_pairing, save_pairing


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database.open_sync(tmp_path / "appliance.db")
    yield database
    database.close()


def product(sku: str, name: str, seq: int = 1) -> ReplicaWrite:
    return ReplicaWrite(entity="product", key=sku, data=json.dumps({"sku": sku, "name": name}), seq=seq, name=name)


def key_of(events: list[OutboxEvent]) -> str:
    return batch_key([(e.id, e.body) for e in events])


# --- the replica and its cursor ---------------------------------------------------------------


def test_a_page_and_its_cursor_commit_together(db: Database) -> None:
    db.write_sync(partial(apply_changes, writes=[product("A", "Apple"), product("B", "Bread")], cursor="2", now=1.0))
    assert sync_state(db._writer).cursor == "2"

    class Boom(Exception):
        pass

    def page_that_fails(conn: sqlite3.Connection) -> None:
        apply_changes(conn, [ReplicaWrite(entity="product", key="A", data=None, seq=3)], cursor="3", now=2.0)
        raise Boom

    with pytest.raises(Boom):
        db.write_sync(page_that_fails)
    state = db.read_sync(sync_state)
    assert state.cursor == "2"  # neither the delete nor the cursor happened
    assert db.read_sync(partial(get_item, entity="product", key="A")) == {"sku": "A", "name": "Apple"}


def test_upserts_replace_and_deletes_remove_every_entity(db: Database) -> None:
    writes = [ReplicaWrite(entity=e, key="k1", data=json.dumps({"v": 1}), seq=1)
              for e in ("price", "stock", "store_config", "media", "device")]
    writes.append(ReplicaWrite(entity="unknown_future_entity", key="x", data="{}", seq=2))
    assert db.write_sync(partial(apply_changes, writes=writes, cursor="2", now=1.0)) == 5
    db.write_sync(partial(apply_changes, writes=[ReplicaWrite(entity="price", key="k1", data='{"v":2}', seq=3),
                                                 ReplicaWrite(entity="stock", key="k1", data=None, seq=4)],
                          cursor="4", now=2.0))
    assert db.read_sync(partial(get_item, entity="price", key="k1")) == {"v": 2, "sku": "k1"}
    assert db.read_sync(partial(get_item, entity="stock", key="k1")) is None
    assert db.read_sync(replica_counts) == {"product": 0, "price": 1, "stock": 0, "store_config": 1, "media": 1,
                                            "device": 1}


def test_snapshot_is_staged_then_swapped_in_one_transaction(db: Database) -> None:
    db.write_sync(partial(apply_changes, writes=[product("OLD", "Old one")], cursor="5", now=1.0))
    db.write_sync(require_snapshot)
    db.write_sync(begin_snapshot)
    db.write_sync(partial(stage_rows, rows=[product("A", "Apple"), product("B", "Bread")]))
    # Until the swap, readers see the old replica.
    assert db.read_sync(partial(get_item, entity="product", key="OLD")) is not None
    assert db.read_sync(sync_state).staged_rows == 2
    counts = db.write_sync(partial(finish_snapshot, cursor="100", now=2.0))
    assert counts["product"] == 2
    assert db.read_sync(partial(get_item, entity="product", key="OLD")) is None
    state = db.read_sync(sync_state)
    assert (state.cursor, state.snapshots, state.staged_rows) == ("100", 1, 0)


def test_an_interrupted_snapshot_starts_again_from_zero(db: Database) -> None:
    db.write_sync(begin_snapshot)
    db.write_sync(partial(stage_rows, rows=[product("GHOST", "deleted meanwhile")]))
    # The box restarts: a new snapshot begins and must not keep the old staged rows.
    db.write_sync(begin_snapshot)
    db.write_sync(partial(stage_rows, rows=[product("A", "Apple")]))
    db.write_sync(partial(finish_snapshot, cursor="9", now=1.0))
    assert db.read_sync(replica_counts)["product"] == 1
    assert db.read_sync(partial(get_item, entity="product", key="GHOST")) is None


@pytest.mark.parametrize("count", [1, STAGE_ROWS_PER_STATEMENT - 1, STAGE_ROWS_PER_STATEMENT,
                                   STAGE_ROWS_PER_STATEMENT + 1, 3 * STAGE_ROWS_PER_STATEMENT + 17])
def test_staging_many_rows_a_statement_keeps_every_row_and_the_last_of_each_key(db: Database, count: int) -> None:
    """Rows are staged many to an INSERT: across the statements' edges (a whole number of
    them, one more, one less) every row lands once, a later row for a key replaces the
    earlier even inside one statement, and unknown entities are counted and skipped."""
    rng = random.Random(count)
    entities = ["product", "price", "stock", "media", "device", "store_config", "novel"]
    rows: list[ReplicaWrite] = []
    for n in range(count):
        entity = rng.choice(entities)
        key = f"K{rng.randrange(max(1, count // 3))}"  # about three rows a key: many repeats
        name = f"Name {n}"
        rows.append(ReplicaWrite(entity=entity, key=key, data=json.dumps({"n": n}), name=name if entity == "product"
                                 else ""))
    expected: dict[str, dict[str, dict[str, object]]] = {}
    for row in rows:
        if row.entity != "novel":
            expected.setdefault(row.entity, {})[row.key] = {"n": json.loads(row.data or "")["n"]}
    db.write_sync(begin_snapshot)
    assert db.write_sync(partial(stage_rows, rows=rows)) == count
    assert db.read_sync(sync_state).staged_rows == count
    counts = db.write_sync(partial(finish_snapshot, cursor="1", now=1.0))
    assert counts == {entity: len(expected.get(entity, {})) for entity in entities if entity != "novel"}
    for entity, items in expected.items():
        for key, data in items.items():
            column = "sku" if entity in ("product", "price", "stock") else "key"
            assert db.read_sync(partial(get_item, entity=entity, key=key)) == {**data, column: key}
    last_products = {r.key: r.name for r in rows if r.entity == "product"}
    names = db.read_sync(lambda c: dict(c.execute("SELECT sku, name FROM products").fetchall()))
    assert names == last_products
    keys = db.read_sync(lambda c: dict(c.execute("SELECT sku, name_key FROM products").fetchall()))
    assert keys == {sku: name_key(name) for sku, name in last_products.items()}


def test_staging_steps_sqlite_once_per_many_rows(db: Database) -> None:
    """Each step of a statement is a hand-back of the GIL by the writer thread (and a wait
    for it while the snapshot is parsed): a batch takes one step per
    STAGE_ROWS_PER_STATEMENT rows, not one per row (SQLite's trace hook fires once a step)."""
    rows = [ReplicaWrite(entity=entity, key=f"SKU-{n:06}", data="{}", name=f"P {n}")
            for n in range(1000) for entity in ("product", "price", "stock", "media")]
    db.write_sync(begin_snapshot)
    steps: list[str] = []
    db._writer.set_trace_callback(steps.append)
    try:
        db.write_sync(partial(stage_rows, rows=rows))
    finally:
        db._writer.set_trace_callback(None)
    inserts = [s for s in steps if s.startswith("INSERT")]
    assert len(inserts) == len(rows) // STAGE_ROWS_PER_STATEMENT  # 4,000 rows, not 4,000 steps
    assert db.read_sync(replica_counts)["product"] == 0  # still staged, not swapped in


def test_another_store_forgets_the_cursor(db: Database) -> None:
    assert db.write_sync(partial(set_store, store_id="s1")) is True
    db.write_sync(partial(apply_changes, writes=[], cursor="7", now=1.0))
    assert db.write_sync(partial(set_store, store_id="s1")) is False
    assert db.read_sync(sync_state).cursor == "7"
    assert db.write_sync(partial(set_store, store_id="s2")) is True
    assert db.read_sync(sync_state).snapshot_needed


# --- search by name prefix, keyset paging -------------------------------------------------------------

names = st.text(alphabet=st.sampled_from("aAbBéÉß z\u00e9\U0001f600\U0010ffff"), max_size=4)


@given(st.lists(names, max_size=25), names, st.integers(min_value=1, max_value=7))
@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_paging_visits_exactly_the_matching_products_in_order(db: Database, product_names: list[str], prefix: str,
                                                              limit: int) -> None:
    def load(conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM products")
        apply_changes(conn, [product(f"S{i:03d}", n) for i, n in enumerate(product_names)], cursor="1", now=1.0)

    db.write_sync(load)
    expected = sorted(((name_key(n), f"S{i:03d}") for i, n in enumerate(product_names)
                       if name_key(n).startswith(name_key(prefix))))
    seen: list[tuple[str, str]] = []
    after = None
    for _ in range(len(product_names) + 2):
        items, token = db.read_sync(partial(search_products, prefix=prefix, limit=limit, after=after))
        assert len(items) <= limit
        seen += [(name_key(i["name"]), i["sku"]) for i in items]
        if token is None:
            break
        after = decode_after(token)
    assert seen == expected


def test_search_uses_the_name_index(db: Database) -> None:
    plan = db._writer.execute(
        "EXPLAIN QUERY PLAN SELECT sku FROM products WHERE name_key >= ? AND name_key < ? "
        "ORDER BY name_key, sku LIMIT 5", ("a", "b")).fetchall()
    assert any("products_by_name" in row[3] for row in plan), plan


@given(st.text(max_size=60))
def test_any_page_token_decodes_or_raises_bad_page_token(token: str) -> None:
    try:
        name, sku = decode_after(token)
    except BadPageToken:
        return
    assert isinstance(name, str) and isinstance(sku, str)


@given(st.text(max_size=20), st.text(max_size=20))
def test_page_tokens_round_trip(name: str, sku: str) -> None:
    try:
        (name + sku).encode("utf-8")
    except UnicodeEncodeError:
        return
    assert decode_after(encode_after(name, sku)) == (name, sku)


# --- the events outbox ------------------------------------------------------------------------------


def fill(db: Database, n: int, start: int = 0) -> None:
    def add(conn: sqlite3.Connection) -> None:
        for i in range(start, start + n):
            enqueue(conn, id=f"e{i}", kind="sale", body=json.dumps({"id": f"e{i}"}), now=100.0 + i)

    db.write_sync(add)


def test_a_batch_in_flight_is_sent_again_under_the_same_key(db: Database) -> None:
    fill(db, 5)
    first = db.write_sync(partial(claim_batch, limit=3, now=1.0, key_of=key_of))
    assert first is not None and [e.id for e in first.events] == ["e0", "e1", "e2"] and not first.resumed
    fill(db, 2, start=5)  # new events must not change the batch in flight
    again = db.write_sync(partial(claim_batch, limit=10, now=2.0, key_of=key_of))
    assert again is not None and again.resumed
    assert again.key == first.key and [e.id for e in again.events] == ["e0", "e1", "e2"]
    assert [e.attempts for e in again.events] == [1, 1, 1]


def test_settling_accepts_rejects_and_requeues_the_rest(db: Database) -> None:
    fill(db, 4)
    batch = db.write_sync(partial(claim_batch, limit=4, now=1.0, key_of=key_of))
    assert batch is not None
    counts = db.write_sync(partial(settle_batch, key=batch.key, accepted=["e0", "e1", "not-ours"],
                                   rejected={"e2": "data.total_cents: must be an integer"}, now=2.0))
    assert counts == (2, 1, 1)
    stats = db.read_sync(outbox_stats)
    assert (stats.queued, stats.in_flight, stats.accepted, stats.rejected) == (1, 0, 2, 1)
    assert stats.oldest_unsent_at == 103.0
    assert db.read_sync(partial(upload_state, event_id="e2")) == {
        "event_id": "e2", "state": "rejected", "reason": "data.total_cents: must be an integer"}
    nxt = db.write_sync(partial(claim_batch, limit=4, now=3.0, key_of=key_of))
    assert nxt is not None and [e.id for e in nxt.events] == ["e3"] and nxt.key != batch.key
    # A rejected event is never claimed again.
    db.write_sync(partial(settle_batch, key=nxt.key, accepted=["e3"], rejected={}, now=4.0))
    assert db.write_sync(partial(claim_batch, limit=4, now=5.0, key_of=key_of)) is None


def test_release_and_reject_a_batch(db: Database) -> None:
    fill(db, 2)
    batch = db.write_sync(partial(claim_batch, limit=2, now=1.0, key_of=key_of))
    assert batch is not None
    assert db.write_sync(partial(release_batch, key=batch.key)) == 2
    single = db.write_sync(partial(claim_batch, limit=1, now=2.0, key_of=key_of))
    assert single is not None and [e.id for e in single.events] == ["e0"]
    assert db.write_sync(partial(reject_batch, key=single.key, reason="HTTP 400", now=3.0)) == 1
    assert db.read_sync(outbox_stats).rejected == 1


def test_accepted_events_are_pruned_after_retention(db: Database) -> None:
    fill(db, 2)
    batch = db.write_sync(partial(claim_batch, limit=2, now=1.0, key_of=key_of))
    assert batch is not None
    db.write_sync(partial(settle_batch, key=batch.key, accepted=["e0", "e1"], rejected={}, now=10.0))
    assert db.write_sync(partial(prune_accepted, before=5.0)) == 0
    assert db.write_sync(partial(prune_accepted, before=11.0)) == 2
    assert db.read_sync(partial(upload_state, event_id="e0")) == {"event_id": "e0", "state": "accepted"}


def test_receive_is_idempotent_on_the_client_id(db: Database) -> None:
    args = {"kind": "sale", "id": "s1", "device_id": "pos", "body": '{"a":1}', "event_id": "sale-s1",
            "event_body": '{"id":"sale-s1"}'}
    assert db.write_sync(partial(receive, now=1.0, **args)).outcome is Received.CREATED
    again = db.write_sync(partial(receive, now=2.0, **args))
    assert (again.outcome, again.body, again.received_at) == (Received.SAME, '{"a":1}', 1.0)
    other = db.write_sync(partial(receive, now=3.0, **{**args, "body": '{"a":2}'}))
    assert other.outcome is Received.CONFLICT
    assert db.read_sync(outbox_stats).queued == 1  # one event, whatever the repeats
    order = db.write_sync(partial(receive, now=4.0, **{**args, "kind": "order"}))  # same event id, other kind
    assert order.outcome is Received.CONFLICT
    assert db._writer.execute("SELECT count(*) FROM device_orders").fetchone()[0] == 0


# --- the pairing file ----------------------------------------------------------------------------------


def test_pairing_file_is_private_and_round_trips(tmp_path: Path) -> None:
    link = StoreLink(store_id="s1", token="tok", services={"store_secret": "ab", "orders": {"queue": "q"}},
                     store_secret="ab", paired_at=5.0)
    assert load_pairing(tmp_path) is None
    save_pairing(tmp_path, link)
    assert stat.S_IMODE(os.stat(tmp_path / PAIRING_FILE).st_mode) == 0o600
    assert load_pairing(tmp_path) == link
    assert "tok" not in repr(link) and "ab" not in repr(link)


@pytest.mark.parametrize("content", ["", "{", "[]", '{"version": 1}', '{"version": 2, "store_id": "s"}',
                                     '{"version": 1, "store_id": "s", "token": "", "services": {}}'])
def test_a_damaged_pairing_file_is_reported(tmp_path: Path, content: str) -> None:
    (tmp_path / PAIRING_FILE).write_text(content)
    with pytest.raises(PairingFileError):
        load_pairing(tmp_path)


def test_the_swap_renames_the_shadow_tables_and_keeps_the_schema(db: Database) -> None:
    def schema(conn: sqlite3.Connection) -> list[tuple[str, str]]:
        return sorted((r[0], r[1]) for r in conn.execute("SELECT type, name FROM sqlite_master"))

    before = db.read_sync(schema)
    for round_ in range(2):  # the second snapshot replaces tables the first one renamed
        db.write_sync(begin_snapshot)
        db.write_sync(partial(stage_rows, rows=[product("A", f"Apple {round_}"), product("A", "Apricot"),
                                                ReplicaWrite(entity="price", key="A", data='{"v":1}'),
                                                ReplicaWrite(entity="novel", key="x", data="{}")]))
        counts = db.write_sync(partial(finish_snapshot, cursor=str(round_), now=1.0))
        assert counts["product"] == 1 and counts["price"] == 1  # a later row for a key replaces the earlier
        assert db.read_sync(partial(get_item, entity="product", key="A")) == {"name": "Apricot", "sku": "A"}
        db.write_sync(drop_old_replica)
        assert db.read_sync(schema) == before  # products_by_name and the rest, under their own names
    plan = db.read_sync(lambda c: c.execute("EXPLAIN QUERY PLAN SELECT sku FROM products WHERE name_key >= 'a' "
                                            "ORDER BY name_key, sku").fetchall())
    assert "products_by_name" in str([tuple(r) for r in plan])
