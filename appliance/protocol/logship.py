"""Shipping log records to the log intake, sans I/O: the batch's bytes, the pace, the answer.

The wire format (docs/cloud-contract.md, "Log intake"): ``POST <url>`` with
``X-Api-Key: <key>``, ``Content-Type: application/json``, ``Content-Encoding: gzip``,
and the body::

    {"appliance_id": "box-7f3a", "ring": "9c1e04aa01f2", "dropped": 0,
     "records": [{"seq": 41, "ts": 1764406800.123, "level": "info", "logger": "...",
                  "msg": "...", "fields": {...}}, ...]}

A record's identity is ``(ring, seq)``; ``dropped`` counts the records lost between the
previous batch and this one (the ring overwrote them before they could be shipped).

- :func:`encode_batch`: the gzip body from already-encoded records (no re-encoding), after
  redaction of the whole text.
- :class:`Pacer`: keeps the average rate under the uplink share.
- :func:`classify`: what an answer means for the shipper (:class:`Outcome`).
- :class:`ShippingStatus`: what the shipper is doing, for health, the bundle and the homepage.
"""

from __future__ import annotations

import enum
import json
import zlib
from collections.abc import Mapping, Sequence
from typing import Final

import attrs

from appliance.protocol.redact import Redactor

__all__ = ["MAX_RETRY_AFTER_S", "Outcome", "Pacer", "ShippingPhase", "ShippingStatus", "classify", "encode_batch",
           "retry_after_s"]

# A Retry-After longer than this is read as this (a misconfigured intake must not silence
# the box for days); the shipper never retries sooner than what it was told, up to this.
MAX_RETRY_AFTER_S: Final = 3600.0
GZIP_LEVEL: Final = 6


def encode_batch(lines: Sequence[bytes], *, appliance_id: str, ring: str, dropped: int,
                 redactor: Redactor) -> bytes:
    """The gzip body for records already encoded as JSON objects (one per item)."""
    head = json.dumps({"appliance_id": appliance_id, "ring": ring, "dropped": dropped},
                      separators=(",", ":")).encode()[:-1]
    text = head + b',"records":[' + b",".join(lines) + b"]}"
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # wbits 31: the gzip format
    return compressor.compress(redactor.redact_bytes(text)) + compressor.flush()


class Pacer:
    """At most ``rate_bytes_per_s`` on average: after ``n`` bytes sent at ``t`` the next
    send waits until ``t + n / rate``. Time is the caller's monotonic ``now``."""

    def __init__(self, rate_bytes_per_s: float) -> None:
        if rate_bytes_per_s <= 0:
            raise ValueError(f"rate must be > 0, got {rate_bytes_per_s}")
        self.rate = rate_bytes_per_s
        self._next = float("-inf")

    def delay(self, now: float) -> float:
        return max(0.0, self._next - now)

    def sent(self, nbytes: int, now: float) -> None:
        self._next = max(now, self._next) + nbytes / self.rate


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """``Retry-After`` in seconds (the delta-seconds form), capped; None if absent or not a number."""
    raw = headers.get("retry-after", "").strip()
    if not raw.isdigit():
        return None
    return min(float(raw), MAX_RETRY_AFTER_S)


class Outcome(enum.StrEnum):
    TAKEN = "taken"  # advance the cursor
    WAIT = "wait"  # 429 or 503: wait Retry-After, then send the same batch
    RETRY = "retry"  # 5xx, a transport error: back off, then send the same batch
    REFUSED = "refused"  # 401 or 403: the key is wrong; retry slowly (pairing may fix it)
    TOO_LARGE = "too_large"  # 413: send fewer records
    REJECTED = "rejected"  # another 4xx: this batch will never be taken; skip it, count it


def classify(status: int) -> Outcome:
    if 200 <= status < 300:
        return Outcome.TAKEN
    if status in (429, 503):
        return Outcome.WAIT
    if status in (401, 403):
        return Outcome.REFUSED
    if status == 413:
        return Outcome.TOO_LARGE
    if 400 <= status < 500 and status not in (408, 409):
        return Outcome.REJECTED
    return Outcome.RETRY


class ShippingPhase(enum.StrEnum):
    OFF = "off"  # no intake configured or paired, or [logs] ship = false
    IDLE = "idle"  # everything shipped; waiting for records
    SENDING = "sending"
    RETRYING = "retrying"  # the last attempt failed; waiting to try again
    REFUSED = "refused"  # the intake refuses the key


@attrs.define(kw_only=True)
class ShippingStatus:
    phase: ShippingPhase = ShippingPhase.OFF
    url: str = ""
    cursor: int = 0  # the last seq the intake took
    shipped: int = 0  # records taken since start
    batches: int = 0
    bytes_sent: int = 0  # compressed bytes of taken batches since start
    dropped_total: int = 0  # records reported dropped, since the ring began
    rejected: int = 0  # records in batches the intake refused for good (4xx), since start
    failures: int = 0  # failed attempts in a row
    last_error: str = ""

    def as_dict(self) -> dict[str, object]:
        data = attrs.asdict(self)
        data["phase"] = str(self.phase)
        return data
