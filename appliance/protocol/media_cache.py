"""What the media cache should hold under its disk budget, and what it is doing: sans-I/O.

The unit is a *blob*: the bytes with one sha256. Several catalog keys may name the same
bytes; they share one cached file. :func:`plan` takes the manifest, which keys are
referenced by active products and the store's configuration ("pinned"), what is cached,
when each blob was last served and the byte budget, and returns what to keep, fetch and
evict. The order, documented in docs/media.md:

1. pinned blobs before the others;
2. then the most recently served first (never served counts as oldest);
3. then by key, so the plan is the same on every run.

Blobs are taken in that order while they fit in the budget; one that does not fit is left
out and the walk goes on (a smaller one further down may still fit). Cached blobs outside
the plan are evicted; blobs the manifest no longer lists are evicted first of all.

:class:`MediaStatus` is what the fetcher last saw: read by the homepage, /api/status and
the health checks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from appliance.protocol.media import MediaEntry
from appliance.protocol.wan import HopFailure

__all__ = ["Blob", "BudgetWalk", "CachePlan", "MediaStatus", "budget_bytes", "plan"]


@attrs.frozen(kw_only=True)
class Blob:
    sha256: str
    size: int
    keys: tuple[str, ...]  # sorted
    pinned: bool
    last_served_at: float  # 0: never

    @property
    def order(self) -> tuple[bool, float, str]:
        return (not self.pinned, -self.last_served_at, self.keys[0])


@attrs.frozen(kw_only=True)
class CachePlan:
    keep: frozenset[str]  # sha256 of blobs to hold (cached or to fetch)
    fetch: tuple[Blob, ...]  # wanted and not cached, in priority order
    evict: frozenset[str]  # cached sha256 to delete
    left_out: tuple[Blob, ...]  # wanted but over the budget
    wanted_bytes: int  # every blob of the manifest
    kept_bytes: int


def budget_bytes(*, max_bytes: int, min_free_bytes: int, cached_bytes: int, free_bytes: int) -> int:
    """Bytes the cache may hold: ``max_bytes``, less whatever would eat into the free-disk floor.

    ``cached_bytes`` is what the cache holds now (it could be freed), ``free_bytes`` the
    disk's free space for this user now.
    """
    return max(0, min(max_bytes, cached_bytes + free_bytes - min_free_bytes))


def blobs_of(entries: Iterable[MediaEntry], *, pinned: frozenset[str],
             last_served: Mapping[str, float]) -> list[Blob]:
    """The manifest's blobs in priority order."""
    by_sha: dict[str, list[MediaEntry]] = {}
    for entry in entries:
        by_sha.setdefault(entry.sha256, []).append(entry)
    blobs = [Blob(sha256=sha, size=max(e.size for e in group), keys=tuple(sorted(e.key for e in group)),
                  pinned=any(e.key in pinned for e in group), last_served_at=last_served.get(sha, 0.0))
             for sha, group in by_sha.items()]
    blobs.sort(key=lambda b: b.order)
    return blobs


@attrs.define
class BudgetWalk:
    """The plan's walk over the blobs in priority order, one at a time: a blob is taken
    while it fits in the budget; one that does not is left out and the walk goes on. The
    media fetcher walks a large manifest this way straight from the database."""

    budget: int
    used: int = 0  # bytes of the blobs taken
    wanted: int = 0  # bytes of every blob walked

    def take(self, size: int) -> bool:
        """Whether the next blob, of ``size`` bytes, is kept."""
        self.wanted += size
        if self.used + size <= self.budget:
            self.used += size
            return True
        return False


def plan(entries: Sequence[MediaEntry], *, pinned: frozenset[str], cached: Mapping[str, int],
         last_served: Mapping[str, float], budget: int) -> CachePlan:
    """What to keep, fetch and evict. ``cached``: sha256 -> size of the verified files."""
    keep: set[str] = set()
    fetch: list[Blob] = []
    left_out: list[Blob] = []
    walk = BudgetWalk(budget)
    for blob in blobs_of(entries, pinned=pinned, last_served=last_served):
        if walk.take(blob.size):
            keep.add(blob.sha256)
            if blob.sha256 not in cached:
                fetch.append(blob)
        else:
            left_out.append(blob)
    evict = frozenset(sha for sha in cached if sha not in keep)
    return CachePlan(keep=frozenset(keep), fetch=tuple(fetch), evict=evict, left_out=tuple(left_out),
                     wanted_bytes=walk.wanted, kept_bytes=walk.used)


@attrs.define(kw_only=True)
class MediaStatus:
    """What the media fetcher last saw (wall-clock unix seconds)."""

    files_wanted: int = 0
    bytes_wanted: int = 0
    files_cached: int = 0
    bytes_cached: int = 0
    # Wanted but not cached, and the words for why ("disk budget 2 GB reached", "downloading").
    files_missing: int = 0
    bytes_missing: int = 0
    over_budget: int = 0
    budget_bytes: int = 0
    bad_entries: int = 0  # manifest rows the box cannot use
    # The fill in progress: bytes received so far of the files queued in this round.
    fill_done_bytes: int = 0
    fill_total_bytes: int = 0
    downloading: list[str] = attrs.field(factory=list)  # keys being fetched now
    last_error: HopFailure | None = None
    last_error_key: str = ""
    last_error_at: float | None = None
    failing: int = 0  # files whose last attempt failed
    fetched: int = 0  # files downloaded and verified since start
    hash_failures: int = 0  # downloads whose bytes did not match their sha256
    last_scan_at: float | None = None
    blocked: str = ""  # why the fetcher cannot run (a [wan] proxy or CA file that cannot be used)

    def as_dict(self) -> dict[str, Any]:
        data = attrs.asdict(self, recurse=False)
        data["downloading"] = list(self.downloading)
        data["last_error"] = self.last_error.as_dict() if self.last_error else None
        return data
