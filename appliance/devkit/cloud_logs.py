"""The simulator's log intake (docs/cloud-contract.md, "Log intake"): what the platform's
log service would keep, strictly checked, for the demo and the tests.

``POST /v1/input`` with ``X-Api-Key``; a gzip (or plain) JSON body
``{"appliance_id", "ring", "dropped", "records": [...]}``. A record's id is ``(ring, seq)``
and is kept once: a batch sent again (the answer was lost) is taken again and changes
nothing, and :attr:`LogIntake.duplicates` counts such records. Every decompressed body is
kept too (:attr:`LogIntake.bodies`, bounded), so a test can grep what really left the box.
Faults come from the simulator's fault plan (path ``/v1/input``): 5xx, 429, slow, cut.
"""

from __future__ import annotations

import collections
import zlib
from typing import Any, Final

from appliance.devkit.cloud_wire import CloudApiError, loads_strict

__all__ = ["MAX_BATCH_BYTES", "MAX_EXPANDED_BYTES", "LogIntake"]

# A compressed batch: the box sends at most a few hundred KiB.
MAX_BATCH_BYTES: Final = 1024 * 1024
# Decompressed, a batch may be larger (gzip of logs is about 8:1); more is a gzip bomb.
MAX_EXPANDED_BYTES: Final = 16 * 1024 * 1024
MAX_RECORDS_PER_BATCH: Final = 10_000
# What the simulator remembers; a week of a busy box is far below it.
MAX_KEPT_RECORDS: Final = 5_000_000
MAX_KEPT_BODIES: Final = 2_000
_ENVELOPE: Final = frozenset({"appliance_id", "ring", "dropped", "records"})


def _expand(raw: bytes, encoding: str) -> bytes:
    if encoding in ("", "identity"):
        return raw
    if encoding != "gzip":
        raise CloudApiError(415, "unsupported_encoding", f"Content-Encoding must be gzip or absent, got {encoding!r}")
    inflater = zlib.decompressobj(31)
    try:
        out = inflater.decompress(raw, MAX_EXPANDED_BYTES + 1)
    except zlib.error as exc:
        raise CloudApiError(400, "invalid_body", f"the body is not valid gzip: {exc}") from exc
    if len(out) > MAX_EXPANDED_BYTES or inflater.unconsumed_tail:
        raise CloudApiError(413, "body_too_large", f"the body expands past {MAX_EXPANDED_BYTES} bytes")
    if not inflater.eof:
        raise CloudApiError(400, "invalid_body", "the gzip body is cut short")
    return out


class LogIntake:
    """The records one simulated intake has taken, keyed ``(ring, seq)``."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.records: dict[tuple[str, int], dict[str, Any]] = {}
        self.wire_records = 0  # records received, counting every copy
        self.duplicates = 0  # copies of records already kept
        self.batches = 0
        self.dropped_reported = 0
        self.bodies: collections.deque[bytes] = collections.deque(maxlen=MAX_KEPT_BODIES)
        self.appliances: set[str] = set()

    def take(self, api_key: str | None, encoding: str, raw: bytes) -> dict[str, Any]:
        if not api_key:
            raise CloudApiError(401, "unauthorized", "missing X-Api-Key")
        if api_key != self.api_key:
            raise CloudApiError(403, "forbidden", "this X-Api-Key is not the store's")
        text = _expand(raw, encoding.strip().lower())
        body = loads_strict(text)
        if not isinstance(body, dict) or set(body) - _ENVELOPE or "records" not in body:
            raise CloudApiError(400, "invalid_body", "a batch is {appliance_id, ring, dropped, records}")
        ring, dropped, records = body.get("ring"), body.get("dropped", 0), body["records"]
        if not isinstance(ring, str) or not ring or not isinstance(body.get("appliance_id"), str):
            raise CloudApiError(400, "invalid_body", "appliance_id and ring: non-empty strings")
        if not isinstance(dropped, int) or isinstance(dropped, bool) or dropped < 0:
            raise CloudApiError(400, "invalid_body", "dropped: an integer >= 0")
        if not isinstance(records, list) or len(records) > MAX_RECORDS_PER_BATCH:
            raise CloudApiError(400, "invalid_body", f"records: a list of at most {MAX_RECORDS_PER_BATCH}")
        for i, record in enumerate(records):
            seq = record.get("seq") if isinstance(record, dict) else None
            if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
                raise CloudApiError(400, "invalid_body", f"records[{i}].seq: an integer >= 1")
            if not all(isinstance(record.get(k), str) for k in ("level", "logger", "msg")):
                raise CloudApiError(400, "invalid_body", f"records[{i}]: level, logger and msg are strings")
        if len(self.records) + len(records) > MAX_KEPT_RECORDS:
            raise CloudApiError(503, "unavailable", "the simulator's log store is full", headers={"Retry-After": "60"})
        self.batches += 1
        self.bodies.append(text)
        self.appliances.add(body["appliance_id"])
        fresh = 0
        for record in records:
            key = (ring, record["seq"])
            self.wire_records += 1
            if key in self.records:
                self.duplicates += 1
                continue
            self.records[key] = record
            fresh += 1
        if fresh:
            self.dropped_reported += dropped
        return {"accepted": len(records)}

    def seqs(self, ring: str | None = None) -> list[int]:
        """The seqs kept, in the order they arrived (of one ring, or of all)."""
        return [seq for (r, seq) in self.records if ring is None or r == ring]

    def summary(self) -> dict[str, Any]:
        return {"records": len(self.records), "wire_records": self.wire_records, "duplicates": self.duplicates,
                "batches": self.batches, "dropped_reported": self.dropped_reported,
                "appliances": sorted(self.appliances)}
