"""The media fetcher's plan read straight from the database, one blob at a time, against the
pure plan over the manifest held in memory (appliance/protocol/media_cache.py): same blobs,
same order, same counts; and a scan hands the fill a bounded window of files."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.protocol.media import MediaEntry, parse_entry
from appliance.protocol.media_cache import blobs_of, plan
from appliance.services.media import FETCH_MAX, walk_plan
from appliance.storage import Database
from appliance.storage import media as rows

SHAS = [f"{n:02x}" * 32 for n in range(6)]


@st.composite
def catalogs(draw: st.DrawFn) -> tuple[list[MediaEntry], set[str], dict[str, tuple[int, float]], list[str]]:
    """Entries (some sharing bytes), the keys pinned by active products, the cached files
    (sha -> (size, last served)), and a few rows that cannot be used."""
    keys = draw(st.lists(st.text("abcxyz", min_size=1, max_size=4), unique=True, max_size=12))
    entries = []
    for key in keys:
        sha = draw(st.sampled_from(SHAS))
        # Entries of one blob may disagree on the size (the blob's is the largest); the
        # sha256 may come in capitals.
        entries.append(MediaEntry(key=key, url=f"https://blob.example/{key}", sha256=sha,
                                  size=draw(st.integers(0, 300)), content_type="image/jpeg"))
    pinned = set(draw(st.lists(st.sampled_from(keys), max_size=4))) if keys else set()
    cached = {sha: (draw(st.integers(1, 300)), draw(st.sampled_from([0.0, 10.0, 20.0, 30.0])))
              for sha in draw(st.lists(st.sampled_from(SHAS), unique=True, max_size=4))}
    bad = draw(st.lists(st.text("mn", min_size=1, max_size=3), unique=True, max_size=2))
    return entries, pinned, cached, bad


def _fill(conn: sqlite3.Connection, entries: list[MediaEntry], pinned: set[str],
          cached: dict[str, tuple[int, float]], bad: list[str]) -> None:
    for table in ("media_manifest", "products", "media_blobs", "media_keys"):
        conn.execute(f"DELETE FROM {table}")
    for n, e in enumerate(entries):
        data = {"url": e.url, "sha256": e.sha256.upper() if n % 2 else e.sha256, "size": e.size,
                "content_type": e.content_type}
        conn.execute("INSERT INTO media_manifest(key, data, seq) VALUES (?, ?, ?)", (e.key, json.dumps(data), n))
    for key in bad:  # a size that is not a number: parse_entry refuses it
        conn.execute("INSERT INTO media_manifest(key, data, seq) VALUES (?, ?, 0)",
                     (key, json.dumps({"url": "https://blob.example/x", "sha256": SHAS[0], "size": "big"})))
    for n, key in enumerate(sorted(pinned)):
        conn.execute("INSERT INTO products(sku, name, name_key, data, seq) VALUES (?, 'p', 'p', ?, 0)",
                     (f"SKU-{n}", json.dumps({"sku": f"SKU-{n}", "image": key})))
    conn.execute("INSERT INTO products(sku, name, name_key, data, seq) VALUES ('SKU-off', 'p', 'p', ?, 0)",
                 (json.dumps({"sku": "SKU-off", "image": entries[0].key if entries else "none", "active": False}),))
    for sha, (size, served) in cached.items():
        conn.execute("INSERT INTO media_blobs(sha256, size, cached_at, last_served_at) VALUES (?, ?, 0, ?)",
                     (sha, size, served))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(catalogs())
def test_the_plan_read_from_the_database_is_the_plan_in_memory(tmp_path: Path, catalog: tuple) -> None:
    entries, pinned, cached, bad = catalog
    db = Database.open_sync(tmp_path / "a.db")
    try:
        db.write_sync(lambda conn: _fill(conn, entries, pinned, cached, bad))
        found = db.read_sync(lambda conn: list(rows.plan_rows(conn, bad)))
        assert db.read_sync(rows.pinned_keys) == frozenset(pinned)
    finally:
        db.close()
    last_served = {sha: served for sha, (_, served) in cached.items()}
    expected = blobs_of(entries, pinned=frozenset(pinned), last_served=last_served)
    assert [(r.sha256, r.size, tuple(sorted(json.loads(r.keys))), r.pinned, r.last_served_at) for r in found] == [
        (b.sha256, b.size, b.keys, b.pinned, b.last_served_at) for b in expected]
    for r in found:
        group = [e for e in entries if e.sha256 == r.sha256]
        assert (r.entries, r.entry_bytes) == (len(group), sum(e.size for e in group))
        assert parse_entry(r.first_key, json.loads(r.first_data)) == min(group, key=lambda e: e.key)
        assert r.cached_size == (cached[r.sha256][0] if r.sha256 in cached else None)
    # The fetcher's walk over those rows decides what the pure plan decides, and counts
    # what the status showed when the manifest was held in memory.
    budget = sum(e.size for e in entries) // 2
    the_plan = plan(entries, pinned=frozenset(pinned), cached={s: v[0] for s, v in cached.items()},
                    last_served=last_served, budget=budget)
    db = Database.open_sync(tmp_path / "a.db")
    try:
        walked = db.read_sync(lambda conn: walk_plan(conn, bad=set(bad), budget=budget))
    finally:
        db.close()
    assert [(b.sha256, b.keys) for b in walked.fetch] == [(b.sha256, b.keys) for b in the_plan.fetch]
    assert {sha for sha, _ in walked.evict} == the_plan.evict
    held = {sha: size for sha, (size, _) in cached.items() if sha not in the_plan.evict}
    missing = [e for e in entries if e.sha256 not in held]
    left = {b.sha256 for b in the_plan.left_out}
    assert (walked.files_wanted, walked.bytes_wanted, walked.files_missing, walked.bytes_missing,
            walked.over_budget, walked.cached_bytes) == (
        len(entries), sum(e.size for e in entries), len(missing), sum(e.size for e in missing),
        sum(1 for e in missing if e.sha256 in left), sum(held.values()))
    # No key is served yet: every entry whose bytes are cached and stay is pointed at them.
    assert walked.point == sorted((e.key, e.sha256) for e in entries if e.sha256 in held) and walked.drop == []


def test_a_scan_hands_the_fill_a_bounded_window(tmp_path: Path) -> None:
    """However many files are missing, one scan asks for FETCH_MAX of them, in the plan's
    order; those in backoff are passed over for the next ones."""
    entries = [MediaEntry(key=f"k{n:05d}", url=f"https://blob.example/{n}", sha256=f"{n:064x}", size=10,
                          content_type="image/jpeg") for n in range(FETCH_MAX + 50)]
    db = Database.open_sync(tmp_path / "a.db")
    try:
        db.write_sync(lambda conn: _fill(conn, entries, set(), {}, []))
        first = db.read_sync(lambda conn: walk_plan(conn, bad=set(), budget=10**9))
        waiting = {b.sha256 for b in first.fetch[:30]}
        second = db.read_sync(lambda conn: walk_plan(conn, bad=set(), budget=10**9, waiting=waiting,
                                                     asked=waiting))
    finally:
        db.close()
    assert [b.keys[0] for b in first.fetch] == [e.key for e in entries[:FETCH_MAX]]
    assert set(first.entries) == {b.sha256 for b in first.fetch}
    assert [b.keys[0] for b in second.fetch] == [e.key for e in entries[30:FETCH_MAX + 30]]
    assert second.wanted_missing == waiting
    assert first.files_missing == len(entries) and first.over_budget == 0
