"""Token buckets per source plus one global bucket: who may get a reply, and when.

A discovery reply is larger than the probe that asks for it, and a UDP source address
can be forged, so an unlimited responder is an amplifier pointed at whoever the forger
names. Each source gets ``burst`` replies at once and ``rate_per_s`` after that; the global
bucket caps the total whatever the number of (possibly forged) sources.

The per-source table holds at most ``max_sources`` entries, least recently seen evicted
first: a flood of forged sources can only reset buckets to full, and the global cap still
holds. Time is the caller's ``now`` (any monotonic clock); a clock that goes backwards
refills nothing.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from typing import Final

__all__ = ["RateLimiter", "RateVerdict", "TokenBucket"]

DEFAULT_MAX_SOURCES: Final = 1024


class RateVerdict(enum.StrEnum):
    ALLOWED = "allowed"
    SOURCE_LIMITED = "source"  # this source is over its own rate
    GLOBAL_LIMITED = "global"  # every source together is over the global cap


def _check(rate_per_s: float, burst: float) -> None:
    if rate_per_s < 0 or burst < 1:
        raise ValueError(f"need rate_per_s >= 0 and burst >= 1, got {rate_per_s}, {burst}")


class TokenBucket:
    """``burst`` tokens, refilled at ``rate_per_s``; one token per allowed event."""

    __slots__ = ("burst", "rate_per_s", "tokens", "updated")

    def __init__(self, *, rate_per_s: float, burst: float, now: float) -> None:
        _check(rate_per_s, burst)
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.tokens = burst
        self.updated = now

    def has_token(self, now: float) -> bool:
        """Refill for the time since the last call (none if ``now`` went back), then look."""
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate_per_s)
        self.updated = max(self.updated, now)
        return self.tokens >= 1

    def take(self) -> None:
        self.tokens -= 1


class RateLimiter:
    def __init__(
        self,
        *,
        rate_per_s: float,
        burst: float,
        global_rate_per_s: float,
        global_burst: float,
        max_sources: int = DEFAULT_MAX_SOURCES,
    ) -> None:
        _check(rate_per_s, burst)
        _check(global_rate_per_s, global_burst)
        if max_sources < 1:
            raise ValueError(f"max_sources must be >= 1, got {max_sources}")
        self.rate_per_s, self.burst = rate_per_s, burst
        self.global_rate_per_s, self.global_burst = global_rate_per_s, global_burst
        self.max_sources = max_sources
        self._global: TokenBucket | None = None  # made on the first call: it needs a `now`
        self._sources: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sources)

    def allow(self, source: str, now: float) -> RateVerdict:
        """Whether ``source`` may have one more reply at ``now``; a token is spent if so."""
        bucket = self._sources.get(source)
        if bucket is None:
            bucket = TokenBucket(rate_per_s=self.rate_per_s, burst=self.burst, now=now)
            self._sources[source] = bucket
            if len(self._sources) > self.max_sources:
                self._sources.popitem(last=False)  # the least recently seen source
        else:
            self._sources.move_to_end(source)
        if self._global is None:
            self._global = TokenBucket(rate_per_s=self.global_rate_per_s, burst=self.global_burst, now=now)
        if not bucket.has_token(now):
            return RateVerdict.SOURCE_LIMITED
        if not self._global.has_token(now):
            return RateVerdict.GLOBAL_LIMITED
        bucket.take()
        self._global.take()
        return RateVerdict.ALLOWED
