"""The media cache's sans-I/O parts: manifest entries, Range, If-None-Match, the rate
limit and the disk-budget plan (its order is the one docs/media.md documents)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.protocol.media import (
    ByteRange,
    MediaEntry,
    MediaEntryError,
    RateLimit,
    Unsatisfiable,
    etag_matches,
    parse_entry,
    parse_range,
)
from appliance.protocol.media_cache import budget_bytes, plan

SHA = "ab" * 32


def entry(key: str, size: int, sha: str | None = None) -> MediaEntry:
    return MediaEntry(key=key, url=f"https://blob.example/{key}",
                      sha256=sha or hashlib.sha256(key.encode()).hexdigest(), size=size, content_type="image/jpeg")


def test_parse_entry_accepts_the_contract_and_names_bad_fields() -> None:
    good = parse_entry("products/a.jpg", {"url": "https://h/a.jpg", "sha256": SHA.upper(), "size": 3,
                                          "content_type": "image/jpeg"})
    assert good.sha256 == SHA and good.etag == f'"{SHA}"' and not good.private
    for field, value in [("url", "http://h/a"), ("sha256", "zz"), ("size", -1), ("size", True),
                         ("content_type", "a\r\nb"), ("private", "yes")]:
        data = {"url": "https://h/a.jpg", "sha256": SHA, "size": 3, field: value}
        with pytest.raises(MediaEntryError, match=field):
            parse_entry("k", data)
    with pytest.raises(MediaEntryError, match="key"):
        parse_entry("", {"url": "https://h/a", "sha256": SHA, "size": 1})


@pytest.mark.parametrize(("header", "size", "expected"), [
    (None, 100, None),
    ("bytes=0-9", 100, ByteRange(0, 9)),
    ("bytes=90-", 100, ByteRange(90, 99)),
    ("bytes=-10", 100, ByteRange(90, 99)),
    ("bytes=-1000", 100, ByteRange(0, 99)),
    ("bytes=95-200", 100, ByteRange(95, 99)),  # over the end: cut at the end
    ("bytes=100-", 100, Unsatisfiable(100)),
    ("bytes=-0", 100, Unsatisfiable(100)),
    ("bytes=0-", 0, Unsatisfiable(0)),
    ("bytes=0-1,5-6", 100, None),  # several ranges: the whole file
    ("bytes=9-1", 100, None),  # invalid: ignored
    ("items=0-1", 100, None),
    ("bytes=a-b", 100, None),
])
def test_parse_range(header: str | None, size: int, expected: object) -> None:
    assert parse_range(header, size) == expected


@given(st.text(max_size=60), st.integers(min_value=0, max_value=10**12))
def test_any_range_header_gives_a_span_inside_the_file_or_none(header: str, size: int) -> None:
    result = parse_range(header, size)
    if isinstance(result, ByteRange):
        assert 0 <= result.start <= result.end < size
    else:
        assert result is None or result == Unsatisfiable(size)


@given(st.integers(min_value=0, max_value=10**9), st.integers(min_value=0, max_value=10**9),
       st.integers(min_value=1, max_value=10**9))
def test_well_formed_ranges_round_trip(first: int, last: int, size: int) -> None:
    result = parse_range(f"bytes={first}-{last}", size)
    if last < first:
        assert result is None
    elif first >= size:
        assert result == Unsatisfiable(size)
    else:
        assert result == ByteRange(first, min(last, size - 1))


def test_etag_matches() -> None:
    etag = f'"{SHA}"'
    assert etag_matches(etag, etag)
    assert etag_matches(f'W/"x", {etag}', etag)
    assert etag_matches(f"W/{etag}", etag)
    assert etag_matches("*", etag)
    assert not etag_matches('"other"', etag)
    assert not etag_matches(None, etag)


def test_rate_limit_keeps_the_average() -> None:
    limit = RateLimit(rate=1000, burst=100, now=0.0)
    assert limit.take(100, 0.0) == 0.0  # the burst
    assert limit.take(500, 0.0) == pytest.approx(0.5)  # 500 bytes owed at 1000/s
    assert limit.take(0, 0.5) == 0.0
    assert RateLimit(rate=0, burst=1, now=0.0).take(10**9, 0.0) == 0.0


def test_budget_keeps_the_free_disk_floor() -> None:
    assert budget_bytes(max_bytes=1000, min_free_bytes=100, cached_bytes=0, free_bytes=10_000) == 1000
    assert budget_bytes(max_bytes=1000, min_free_bytes=100, cached_bytes=200, free_bytes=500) == 600
    assert budget_bytes(max_bytes=1000, min_free_bytes=900, cached_bytes=0, free_bytes=500) == 0


def test_plan_order_pinned_then_recently_served_then_key() -> None:
    a, b, c, d, e = (entry(k, 100) for k in ("a", "b", "c", "d", "e"))
    served = {b.sha256: 50.0, c.sha256: 80.0}
    the_plan = plan([a, b, c, d, e], pinned=frozenset({"e"}), cached={}, last_served=served, budget=300)
    # e is pinned; then c (served at 80), b (at 50); a and d never served: left out.
    assert [blob.keys[0] for blob in the_plan.fetch] == ["e", "c", "b"]
    assert [blob.keys[0] for blob in the_plan.left_out] == ["a", "d"]
    assert the_plan.kept_bytes == 300 and the_plan.wanted_bytes == 500


def test_plan_evicts_least_recently_served_and_unlisted() -> None:
    a, b, c = entry("a", 100), entry("b", 100), entry("c", 100)
    cached = {a.sha256: 100, b.sha256: 100, "f" * 64: 50}
    served = {a.sha256: 10.0, b.sha256: 20.0}
    the_plan = plan([a, b, c], pinned=frozenset({"c"}), cached=cached, last_served=served, budget=200)
    assert the_plan.keep == {c.sha256, b.sha256}
    assert the_plan.evict == {a.sha256, "f" * 64}
    assert [blob.keys[0] for blob in the_plan.fetch] == ["c"]


def test_plan_skips_what_does_not_fit_and_goes_on() -> None:
    big, small = entry("a-big", 500), entry("b-small", 50)
    the_plan = plan([big, small], pinned=frozenset(), cached={}, last_served={}, budget=100)
    assert [blob.keys[0] for blob in the_plan.fetch] == ["b-small"]
    assert [blob.keys[0] for blob in the_plan.left_out] == ["a-big"]


def test_keys_sharing_bytes_share_one_file() -> None:
    one, two = entry("x", 100, SHA), entry("y", 100, SHA)
    the_plan = plan([one, two], pinned=frozenset({"y"}), cached={}, last_served={}, budget=100)
    assert len(the_plan.fetch) == 1 and the_plan.fetch[0].keys == ("x", "y") and the_plan.fetch[0].pinned
