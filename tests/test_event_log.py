"""The event log's pure parts and its storage: subscriptions and what a credential may see,
bodies kept small, retention, ids never reused, and the hub's ring and followers."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from appliance.protocol.event_stream import (
    BODY_MAX_BYTES,
    EVENT_TYPES,
    Forbidden,
    Grant,
    StoredEvent,
    Subscription,
    SubscriptionError,
    Topic,
    coalesced,
    small_body,
)
from appliance.services import event_hub
from appliance.services.event_hub import EventHub, Follower, TooSlow, stored_event
from appliance.storage import Database
from appliance.storage.event_log import LogRow, append, bounds, prune, read_after

ADMIN = Grant(admin=True)
TILL = Grant(admin=False, device_id="till-1")


@given(st.dictionaries(st.sampled_from(["topics", "device", "sku_prefix", "after", "coalesce", "x"]), st.text()),
       st.none() | st.text())
def test_any_query_parses_or_is_refused_with_our_error(params: dict[str, str], last_event_id: str | None) -> None:
    try:
        sub = Subscription.parse(params, last_event_id=last_event_id)
    except SubscriptionError as exc:
        assert str(exc)
    else:
        assert sub.topics and (sub.after is None or sub.after >= 0)


def test_a_subscription_reads_its_parameters() -> None:
    sub = Subscription.parse({"topics": "catalog, orders", "sku_prefix": "A-", "after": "42", "coalesce": "1"})
    assert sub.topics == {Topic.CATALOG, Topic.ORDERS} and sub.after == 42 and sub.coalesce
    assert Subscription.parse({}).topics == frozenset(Topic) and Subscription.parse({}).after is None
    assert Subscription.parse({}, last_event_id="7").after == 7
    assert Subscription.parse({"after": "3"}, last_event_id="7").after == 7  # a reconnecting EventSource
    with pytest.raises(SubscriptionError, match="unknown topic"):
        Subscription.parse({"topics": "catalog,weather"})


def test_a_device_sees_its_own_device_and_the_store_only() -> None:
    mine = Subscription.parse({}).limited_to(TILL)
    assert mine.device == "till-1"
    assert mine.matches(topic="commands", device_id="till-1", subject="")
    assert not mine.matches(topic="commands", device_id="kds-1", subject="")
    assert mine.matches(topic="catalog", device_id="", subject="A-1")  # store-wide
    with pytest.raises(Forbidden, match="kds-1"):
        Subscription.parse({"device": "kds-1"}).limited_to(TILL)
    assert Subscription.parse({"device": "kds-1"}).limited_to(ADMIN).device == "kds-1"


def test_a_sku_prefix_narrows_catalog_events_only() -> None:
    sub = Subscription.parse({"sku_prefix": "DRINK-"})
    assert sub.matches(topic="catalog", device_id="", subject="DRINK-7")
    assert not sub.matches(topic="catalog", device_id="", subject="FOOD-1")
    assert sub.matches(topic="orders", device_id="", subject="order-1")


def test_a_big_body_keeps_its_ids_and_says_it_was_cut() -> None:
    body = json.loads(small_body({"sku": "A", "product": {"text": "x" * 5000}}, optional="product"))
    assert body == {"sku": "A", "truncated": True}
    assert len(small_body({"sku": "A", "product": {"text": "x" * 100}}, optional="product")) < BODY_MAX_BYTES


def test_coalesced_messages_are_json_arrays_of_events() -> None:
    texts = [json.dumps({"id": i}) for i in range(600)]
    packed = coalesced(texts)
    assert [len(json.loads(p)) for p in packed] == [256, 256, 88]
    assert [e["id"] for p in packed for e in json.loads(p)] == list(range(600))


@pytest.fixture
def db(tmp_path: Path) -> Database:  # type: ignore[misc]
    database = Database.open_sync(tmp_path / "state" / "appliance.db")
    yield database
    database.close()


def test_retention_by_count_and_age_and_ids_never_reused(db: Database, tmp_path: Path) -> None:
    for i in range(30):
        db.write_sync(lambda conn, i=i: append(conn, "sale.received", {"id": str(i)}, now=1000.0 + i))
    assert db.write_sync(lambda conn: prune(conn, max_rows=10, before=0.0)) == 20
    assert db.read_sync(bounds).oldest == 21 and db.read_sync(bounds).rows == 10
    assert db.write_sync(lambda conn: prune(conn, max_rows=10, before=1025.0)) == 5  # older than the age bound
    db.write_sync(lambda conn: prune(conn, max_rows=10, before=10_000.0))
    assert db.read_sync(bounds).rows == 0 and db.read_sync(bounds).head == 30
    db.close()
    again = Database.open_sync(tmp_path / "state" / "appliance.db")
    try:
        assert again.read_sync(bounds).oldest == 31  # empty: the next id to come
        new = again.write_sync(lambda conn: append(conn, "sale.received", {"id": "new"}, now=2000.0))
        assert new == 31
    finally:
        again.close()


def test_a_rolled_back_change_leaves_no_event(db: Database) -> None:
    def fails(conn: sqlite3.Connection) -> None:
        append(conn, "sale.received", {"id": "x"}, now=1.0)
        raise RuntimeError("the change failed")

    with pytest.raises(RuntimeError):
        db.write_sync(fails)
    assert db.read_sync(lambda conn: read_after(conn, 0, 10)) == []


def test_every_type_has_a_known_topic() -> None:
    assert {str(t) for t in EVENT_TYPES.values()} <= {str(t) for t in Topic}
    assert set(EVENT_TYPES.values()) == set(Topic)


async def test_a_follower_that_falls_out_of_the_ring_is_too_slow(db: Database) -> None:
    hub = EventHub(ring_events=8)
    for i in range(40):
        await db.write(lambda conn, i=i: append(conn, "sale.received", {"id": str(i)}, now=float(i)))
    rows = await db.read(lambda conn: read_after(conn, 0, 100))
    hub.load(rows[:20])
    hub.set_bounds(await db.read(bounds))
    # Resuming from far back: read from the log until it reaches the ring, no gap.
    resumer = Follower(hub=hub, db=db, sub=Subscription.parse({"after": "2"}), cursor=2, max_lag_s=60.0)
    got: list[int] = []
    while resumer.cursor < hub.head:
        got += [e.id for e in await resumer.next_batch()]
    assert got == list(range(3, 21))
    # Caught up once; then 20 more events arrive while it does not read: out of the ring.
    hub.load(rows[20:])
    with pytest.raises(TooSlow) as slow:
        await resumer.next_batch()
    assert slow.value.resume_after == 20


async def test_a_follower_behind_for_too_long_is_too_slow(db: Database, autojump_clock: trio.abc.Clock) -> None:
    hub = EventHub(ring_events=1000)
    follower = Follower(hub=hub, db=db, sub=Subscription.parse({}), cursor=0, max_lag_s=5.0)
    for i in range(3):
        await db.write(lambda conn, i=i: append(conn, "sale.received", {"id": str(i)}, now=float(i)))
    rows = await db.read(lambda conn: read_after(conn, 0, 100))
    async def later() -> None:
        await trio.sleep(1.0)
        hub.load(rows[:1])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(later)
        started = trio.current_time()
        assert [e.id for e in await follower.next_batch()] == [1]  # waits for it
        assert trio.current_time() - started == 1.0
    hub.load(rows[1:])
    assert [e.id for e in await follower.next_batch()] == [2, 3]  # behind for no time at all
    hub.load([])
    follower.behind_since = trio.current_time() - 6.0
    follower.cursor = 2
    with pytest.raises(TooSlow, match="behind for over 5 s"):
        await follower.next_batch()
    assert hub.start(Subscription.parse({"after": "99"})) == (3, True)  # never written here: resync
    assert hub.start(Subscription.parse({})) == (3, False)


async def test_events_loaded_with_nobody_subscribed_reach_later_subscribers_whole_and_in_order(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub makes an event's text at its first take when it was loaded with nobody
    subscribed (none made before): every subscriber, wherever it starts, still gets every
    event, in order, with the text made as at load (once, shared by all), mixed with events
    made at load."""
    made: list[int] = []

    def counted(row: LogRow, loaded_at: float = 0.0) -> StoredEvent:
        made.append(row.id)
        return stored_event(row, loaded_at)

    monkeypatch.setattr(event_hub, "stored_event", counted)
    hub = EventHub(ring_events=100)
    for i in range(12):
        await db.write(lambda conn, i=i: append(conn, "sale.received", {"id": str(i)}, now=1_700_000_000.5 + i))
    rows = await db.read(lambda conn: read_after(conn, 0, 100))
    expected = {r.id: stored_event(r).text for r in rows}
    hub.load(rows[:5])  # nobody subscribed: left to make
    assert made == []
    hub.subscribers = 1
    hub.load(rows[5:8])  # a subscriber: made at load
    assert made == [6, 7, 8]
    hub.subscribers = 0
    hub.load(rows[8:])
    assert [e.id for e in hub.from_ring(6, 100) or []] == [7, 8, 9, 10, 11, 12]
    assert made == [6, 7, 8, 9, 10, 11, 12]
    hub.subscribers = 2
    takes: list[list[StoredEvent]] = []
    for cursor in (0, 3, 0):
        follower = Follower(hub=hub, db=db, sub=Subscription.parse({}), cursor=cursor, max_lag_s=60.0)
        got: list[StoredEvent] = []
        while follower.cursor < hub.head:
            got += await follower.next_batch()
        takes.append(got)
    first, later, again = takes
    assert [e.id for e in first] == list(range(1, 13)) and [e.id for e in later] == list(range(4, 13))
    assert all(e.text == expected[e.id] for e in first + later)
    assert all(a is b for a, b in zip(first, again, strict=True))  # made once, shared
    assert all(a is b for a, b in zip(first[3:], later, strict=True))
    assert all(e.loaded_at > 0 for e in first)  # when it was read, for the hand-over times
    assert [e.id for e in hub.from_ring(10, 1) or []] == [11]
    assert sorted(made) == list(range(1, 13))  # each made once


def test_docs_show_every_event_type_with_an_example() -> None:
    import re

    text = (Path(__file__).resolve().parent.parent / "docs" / "events.md").read_text("utf-8")
    shown = set(re.findall(r'\{"type": "([a-z_]+\.[a-z_]+)", "data": \{', text))
    assert shown == set(EVENT_TYPES), (set(EVENT_TYPES) - shown, shown - set(EVENT_TYPES))
    for line in text.splitlines():
        if line.startswith('{"type": "') and '"data"' in line:
            json.loads(line)  # every example is valid JSON
