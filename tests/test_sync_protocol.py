"""The sans-I/O sync core (appliance/protocol/sync.py): parsers, the status table,
Retry-After, the retry schedule, the batch key and batch splitting."""

from __future__ import annotations

import contextlib
import json
import random
from email.utils import formatdate
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.protocol.sync import (
    RETRY_AFTER_MAX_S,
    CallVerdict,
    LoopStatus,
    Op,
    Pacer,
    SnapshotEnd,
    SnapshotReader,
    SnapshotRecord,
    SyncProtocolError,
    SyncStatus,
    Uplink,
    batch_key,
    http_failure,
    judge,
    parse_changes,
    parse_error,
    parse_events_answer,
    parse_pairing,
    parse_retry_after,
)
from appliance.protocol.wan import Hop

# --- changes pages ---------------------------------------------------------------------


def test_changes_page_parses_and_sorts_by_seq() -> None:
    body = json.dumps({
        "changes": [
            {"seq": 42, "entity": "product", "op": "delete", "key": "SKU-3", "data": None},
            {"seq": 41, "entity": "price", "op": "upsert", "key": "SKU-7",
             "data": {"sku": "SKU-7", "amount_cents": 349, "currency": "EUR"}},
        ],
        "cursor": "42", "more": False, "future_field": 1,
    }).encode()
    page = parse_changes(body)
    assert [c.seq for c in page.changes] == [41, 42]
    assert page.changes[0].op is Op.UPSERT and page.changes[0].data == {"sku": "SKU-7", "amount_cents": 349,
                                                                         "currency": "EUR"}
    assert page.changes[1].op is Op.DELETE and page.changes[1].data is None
    assert (page.cursor, page.more) == ("42", False)


@pytest.mark.parametrize("body", [
    b"", b"[]", b"{", b'{"changes": [], "cursor": "1"}', b'{"changes": {}, "cursor": "1", "more": false}',
    b'{"changes": [], "cursor": 1, "more": false}', b'{"changes": [], "cursor": "", "more": false}',
    b'{"changes": [{"seq": "1", "entity": "product", "op": "upsert", "key": "a", "data": {}}], '
    b'"cursor": "1", "more": false}',
    b'{"changes": [{"seq": 1, "entity": "product", "op": "merge", "key": "a", "data": {}}], '
    b'"cursor": "1", "more": false}',
    b'{"changes": [{"seq": 1, "entity": "product", "op": "upsert", "key": "a", "data": null}], '
    b'"cursor": "1", "more": false}',
    b'{"changes": [{"seq": 1, "entity": "product", "op": "upsert", "key": "\\ud800", "data": {}}], '
    b'"cursor": "1", "more": false}',
    b'{"changes": [], "cursor": "1", "more": "no"}',
])
def test_bad_changes_pages_are_refused(body: bytes) -> None:
    with pytest.raises(SyncProtocolError):
        parse_changes(body)


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_any_bytes_parse_or_raise_the_protocol_error(data: bytes) -> None:
    for parser in (parse_changes, parse_pairing, parse_events_answer):
        with contextlib.suppress(SyncProtocolError):
            parser(data)
    code, reason = parse_error(data)  # never raises
    assert isinstance(code, str) and isinstance(reason, str)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@given(st.dictionaries(st.sampled_from(["changes", "cursor", "more", "x"]), json_values, max_size=4))
def test_any_json_object_parses_or_raises_the_protocol_error(obj: dict[str, Any]) -> None:
    with contextlib.suppress(SyncProtocolError):
        parse_changes(json.dumps(obj).encode())


# --- the snapshot stream --------------------------------------------------------------------

records = st.lists(
    st.tuples(st.sampled_from(["product", "price", "stock", "media"]), st.text(min_size=1, max_size=8),
              st.dictionaries(st.text(max_size=4), st.integers() | st.text(max_size=6), max_size=3)),
    max_size=20)


def _snapshot(items: list[tuple[str, str, dict[str, Any]]], cursor: str = "77") -> bytes:
    lines = [json.dumps({"entity": e, "key": k, "data": d}) for e, k, d in items]
    lines.append(json.dumps({"cursor": cursor, "count": len(items)}))
    return ("\n".join(lines) + "\n").encode()


@given(records, st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=50))
def test_snapshot_events_do_not_depend_on_chunking(items: list[tuple[str, str, dict[str, Any]]],
                                                    sizes: list[int]) -> None:
    raw = _snapshot(items)
    whole = SnapshotReader()
    expected = whole.receive_data(raw)
    whole.close()
    reader = SnapshotReader()
    got: list[SnapshotRecord | SnapshotEnd] = []
    pos, i = 0, 0
    while pos < len(raw):
        size = sizes[i % len(sizes)]
        got += reader.receive_data(raw[pos:pos + size])
        pos, i = pos + size, i + 1
    assert reader.close() == SnapshotEnd(cursor="77", count=len(items))
    assert got == expected
    assert [(r.entity, r.key, json.loads(r.data)) for r in got if isinstance(r, SnapshotRecord)] == items


def test_a_short_snapshot_is_refused() -> None:
    raw = _snapshot([("product", "a", {}), ("product", "b", {})])
    cut = raw[: raw.index(b'{"cursor"')]
    reader = SnapshotReader()
    reader.receive_data(cut)
    with pytest.raises(SyncProtocolError, match="without its final line"):
        reader.close()


def test_a_wrong_count_is_refused() -> None:
    raw = b'{"entity": "product", "key": "a", "data": {}}\n{"cursor": "9", "count": 2}\n'
    reader = SnapshotReader()
    reader.receive_data(raw)
    with pytest.raises(SyncProtocolError, match="counts 2"):
        reader.close()


def test_snapshot_final_line_without_newline_is_accepted() -> None:
    reader = SnapshotReader()
    reader.receive_data(b'{"entity": "product", "key": "a", "data": {}}\n{"cursor": "9", "count": 1}')
    assert reader.close() == SnapshotEnd(cursor="9", count=1)


def test_data_after_the_final_line_is_refused() -> None:
    reader = SnapshotReader()
    with pytest.raises(SyncProtocolError, match="after the final line"):
        reader.receive_data(b'{"cursor": "9", "count": 0}\n{"entity": "product", "key": "a", "data": {}}\n')


def test_an_overlong_line_is_refused_before_it_is_buffered() -> None:
    reader = SnapshotReader(max_line_bytes=100)
    with pytest.raises(SyncProtocolError, match="longer than 100"):
        for _ in range(10):
            reader.receive_data(b"x" * 30)  # no newline: the buffer must not grow past the bound
    assert len(reader._buffer) <= 130


@given(st.binary(max_size=200))
def test_any_snapshot_bytes_parse_or_raise_the_protocol_error(data: bytes) -> None:
    reader = SnapshotReader()
    try:
        reader.receive_data(data)
        reader.close()
    except SyncProtocolError:
        pass


# --- pairing and events answers --------------------------------------------------------------


def test_pairing_answer_keeps_every_service() -> None:
    services = {"orders": {"queue": "q"}, "support": None, "media": {"base_url": "https://x/"}, "logs": None,
                "store_secret": "ab" * 32}
    answer = parse_pairing(json.dumps({"store_id": "s1", "token": "t", "services": services}).encode())
    assert (answer.store_id, answer.token, answer.store_secret) == ("s1", "t", "ab" * 32)
    assert answer.services == services
    with pytest.raises(SyncProtocolError, match="store_secret"):
        parse_pairing(json.dumps({"store_id": "s1", "token": "t", "services": {}}).encode())
    with pytest.raises(SyncProtocolError, match="orders"):
        parse_pairing(json.dumps({"store_id": "s1", "token": "t",
                                  "services": {"store_secret": "x", "orders": "q"}}).encode())


def test_events_answer() -> None:
    answer = parse_events_answer(b'{"accepted": ["a", "b"], "rejected": [{"id": "c", "index": 2, "reason": "bad"},'
                                 b' {"id": "d"}]}')
    assert answer.accepted == ("a", "b")
    assert answer.rejected == {"c": "bad", "d": "rejected (no reason given)"}


# --- what a status means ------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "verdict"), [
    (200, CallVerdict.OK), (201, CallVerdict.OK), (401, CallVerdict.REPAIR), (403, CallVerdict.REPAIR),
    (410, CallVerdict.GONE),
    (429, CallVerdict.RETRY), (503, CallVerdict.RETRY), (500, CallVerdict.RETRY), (502, CallVerdict.RETRY),
    (504, CallVerdict.RETRY),
    (409, CallVerdict.RETRY), (408, CallVerdict.RETRY), (400, CallVerdict.REFUSED), (413, CallVerdict.REFUSED),
    (422, CallVerdict.REFUSED), (404, CallVerdict.REFUSED), (415, CallVerdict.REFUSED),
])
def test_status_table(status: int, verdict: CallVerdict) -> None:
    decision = judge(status, retry_after_s=7.0)
    assert decision.verdict is verdict
    assert decision.delay_s == (7.0 if verdict is CallVerdict.RETRY else None)


def test_retry_after_forms() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("2", now=now) == 2.0
    assert parse_retry_after(" 120 ", now=now) == 120.0
    assert parse_retry_after("0", now=now) == 0.0
    assert parse_retry_after(None, now=now) is None
    assert parse_retry_after("soon", now=now) is None
    assert parse_retry_after("-3", now=now) is None
    assert parse_retry_after("99999999999999999999", now=now) == RETRY_AFTER_MAX_S
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30.0)
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now=now) == 0.0


@given(st.text(max_size=40), st.floats(min_value=0, max_value=4e9))
def test_retry_after_is_none_or_a_bounded_delay(value: str, now: float) -> None:
    delay = parse_retry_after(value, now=now)
    assert delay is None or 0.0 <= delay <= RETRY_AFTER_MAX_S


@given(st.integers(min_value=0, max_value=10**6))
def test_retry_after_seconds_round_trip(seconds: int) -> None:
    assert parse_retry_after(str(seconds), now=0.0) == min(float(seconds), RETRY_AFTER_MAX_S)


def test_pacer_backs_off_is_capped_and_never_retries_before_retry_after() -> None:
    pacer = Pacer(initial_s=1.0, max_s=8.0, rng=random.Random(1))
    delays = [pacer.failure() for _ in range(6)]
    assert all(0.75 * b <= d <= b for d, b in zip(delays, [1, 2, 4, 8, 8, 8], strict=True))
    assert pacer.failure(30.0) == 30.0  # Retry-After above the backoff wins
    assert pacer.failure(0.5) >= 6.0  # below the backoff: the backoff wins
    assert pacer.failures == 8
    assert pacer.success(5.0) == 5.0 and pacer.failures == 0
    assert pacer.failure() <= 1.0


# --- batches --------------------------------------------------------------------------------------


@given(st.lists(st.tuples(st.text(max_size=8), st.text(max_size=20)), max_size=10))
def test_batch_key_is_deterministic_and_fits_the_contract(events: list[tuple[str, str]]) -> None:
    key = batch_key(events)
    assert key == batch_key(list(events))
    assert 1 <= len(key) <= 128 and all(c.isalnum() or c in "._:-" for c in key)
    assert batch_key(events, salt=1) != key


def test_batch_key_changes_with_content() -> None:
    assert batch_key([("a", "{}")]) != batch_key([("a", '{"x":1}')])
    assert batch_key([("a", "{}"), ("b", "{}")]) != batch_key([("b", "{}"), ("a", "{}")])
    assert batch_key([("ab", "")]) != batch_key([("a", "b")])


def test_a_refused_batch_is_split_until_the_bad_event_is_alone() -> None:
    uplink = Uplink(limit=100)
    assert uplink.refused(100, status=400, code="invalid_body") is False
    assert uplink.limit == 50
    assert uplink.refused(50, status=413, code="") is False
    assert uplink.limit == 25
    assert uplink.refused(1, status=400, code="invalid_body") is True
    uplink.sent()
    assert uplink.limit == 100
    assert Uplink(limit=10_000).limit == 500  # the platform's per-request bound


def test_a_reused_key_re_keys_a_few_times_then_is_handled_like_any_refusal() -> None:
    uplink = Uplink(limit=10)
    for salt in (1, 2, 3):
        assert uplink.refused(1, status=422, code="idempotency_key_reused") is False
        assert uplink.key_salt == salt
    assert uplink.refused(1, status=422, code="idempotency_key_reused") is True  # no endless loop
    assert uplink.key_salt == 3
    uplink.unanswered()
    assert uplink.key_salt == 4


# --- failures in words -----------------------------------------------------------------------------


def test_http_failures_say_what_to_do() -> None:
    assert "pair the box again" in http_failure("api:443", 401).fix
    assert "retries by itself" in http_failure("api:443", 503, code="unavailable").fix
    error = http_failure("api:443", 400, code="invalid_cursor", reason="not a cursor")
    assert error.hop is Hop.HTTP and error.message == "api:443 answered HTTP 400 invalid_cursor: not a cursor"


def test_sync_status_reports_the_latest_failing_loop() -> None:
    status = SyncStatus()
    assert status.last_error() is None
    status.pull.failed(http_failure("a", 503), now=10.0)
    status.push.failed(http_failure("a", 500), now=20.0)
    assert status.last_error() == http_failure("a", 500)
    status.push.ok(30.0)
    assert status.last_error() == http_failure("a", 503)
    loop = LoopStatus()
    loop.failed(http_failure("a", 503), now=1.0)
    loop.failed(http_failure("a", 503), now=2.0)
    assert (loop.failing_since, loop.failures) == (1.0, 2)
