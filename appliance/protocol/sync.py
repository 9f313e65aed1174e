"""The cloud sync protocol (docs/architecture.md §4, docs/cloud-contract.md), sans-I/O.

What is here: the parsers of the platform's answers (a changes page, the NDJSON snapshot
fed in any chunks, the pairing answer, the events answer, an error body), the table of
what each HTTP status means for the box (:func:`judge`), Retry-After, the per-loop retry
schedule (:class:`Pacer`), the batch Idempotency-Key, and the push loop's batch sizing
(:class:`Uplink`). Nothing here touches a socket, a clock or a file: times come in as
``now`` arguments.

Exceptions::

    SyncProtocolError (ValueError)   an answer that breaks the contract (bad JSON, a
                                     missing field, an oversized line, a short snapshot)

Failures of the network path are described by :class:`HopFailure` values, not raised here.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from email.utils import mktime_tz, parsedate_tz
from typing import Any, Final

import attrs
import msgspec

from appliance.protocol.backoff import Backoff
from appliance.protocol.text import Text
from appliance.protocol.wan import FIXES, Hop, HopFailure

__all__ = [
    "EVENTS_PER_BATCH_MAX",
    "ID_PATTERN",
    "MAX_SNAPSHOT_LINE_BYTES",
    "RETRY_AFTER_MAX_S",
    "CallVerdict",
    "Change",
    "ChangesPage",
    "Decision",
    "EventsAnswer",
    "LoopStatus",
    "Op",
    "Pacer",
    "PairingAnswer",
    "SnapshotEnd",
    "SnapshotReader",
    "SnapshotRecord",
    "SyncProtocolError",
    "SyncStatus",
    "Uplink",
    "batch_key",
    "http_failure",
    "judge",
    "parse_changes",
    "parse_error",
    "parse_events_answer",
    "parse_pairing",
    "parse_retry_after",
    "product_name",
]

# The contract's limits (docs/cloud-contract.md, "Limits").
EVENTS_PER_BATCH_MAX: Final = 500
ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# The owner's admin credential in a pairing answer (URL-safe, typeable).
ADMIN_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9_.~-]{24,128}")
# One snapshot line is one record: a product is a few hundred bytes. A line this long
# is a broken stream, and refusing it bounds what the reader buffers.
MAX_SNAPSHOT_LINE_BYTES: Final = 1_048_576
# A Retry-After above this is treated as this: a typo on the platform must not park
# every shop's uploads for days. Still "never sooner than asked" up to an hour.
RETRY_AFTER_MAX_S: Final = 3600.0
# Times a refused batch is sent again under a new key before it is split like any other.
REKEYS_MAX: Final = 3


class SyncProtocolError(ValueError):
    """The platform's answer does not follow the contract."""


# --- values ---------------------------------------------------------------------------


class Op(enum.StrEnum):
    UPSERT = "upsert"
    DELETE = "delete"


@attrs.frozen(kw_only=True)
class Change:
    seq: int
    entity: str
    op: Op
    key: str
    data: Mapping[str, Any] | None  # None for a delete


@attrs.frozen(kw_only=True)
class ChangesPage:
    changes: tuple[Change, ...]
    cursor: str
    more: bool


class SnapshotRecord(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One record of the snapshot. ``data`` is its data, a JSON object's text as the
    platform sent it (valid UTF-8, kept as is so it is not parsed and encoded again on its
    way to the replica); ``name`` is a product's display name ("" when it has none).
    A msgspec struct: made 400,000 times per 100k-product snapshot, where a frozen attrs
    class's ``__init__`` was a sixth of the reading thread's samples (py-spy)."""

    entity: str
    key: str
    data: str
    name: str = ""


@attrs.frozen(kw_only=True)
class SnapshotEnd:
    cursor: str
    count: int


@attrs.frozen(kw_only=True)
class PairingAnswer:
    store_id: str
    token: str
    services: Mapping[str, Any]  # as received; holds store_secret
    store_secret: str
    # The owner's admin credential for this box ("" when the platform sends none): the
    # back office shows it to the store's owner (docs/cloud-contract.md, Pairing).
    admin_token: str = attrs.field(default="", repr=False)


@attrs.frozen(kw_only=True)
class EventsAnswer:
    accepted: tuple[str, ...]
    rejected: Mapping[str, str]  # id -> reason


# --- parsers ----------------------------------------------------------------------------


_DECODE: Final = json.JSONDecoder().decode


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        value = _DECODE(body.decode("utf-8"))  # the contract's bodies are UTF-8
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SyncProtocolError(f"{what}: not JSON: {exc}") from exc
    except RecursionError as exc:
        raise SyncProtocolError(f"{what}: JSON nested too deep") from exc
    if not isinstance(value, dict):
        raise SyncProtocolError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


def _text(obj: Mapping[str, Any], field: str, what: str, *, allow_empty: bool = False) -> str:
    value = obj.get(field)
    if not isinstance(value, str) or (not value and not allow_empty):
        raise SyncProtocolError(f"{what}: {field} must be a non-empty string, got {value!r:.60}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SyncProtocolError(f"{what}: {field} is not valid Unicode") from exc
    return value


def _record(obj: Mapping[str, Any], what: str) -> tuple[str, str, Mapping[str, Any] | None]:
    entity = _text(obj, "entity", what)
    key = _text(obj, "key", what)
    data = obj.get("data")
    if data is not None and not isinstance(data, dict):
        raise SyncProtocolError(f"{what}: data must be an object or null")
    return entity, key, data


def parse_changes(body: bytes) -> ChangesPage:
    """A ``GET .../changes`` answer. Changes come back sorted by ``seq``."""
    obj = _json_object(body, "changes")
    raw = obj.get("changes")
    if not isinstance(raw, list):
        raise SyncProtocolError("changes: 'changes' must be a list")
    more = obj.get("more")
    if not isinstance(more, bool):
        raise SyncProtocolError("changes: 'more' must be true or false")
    cursor = _text(obj, "cursor", "changes")
    changes = []
    for i, item in enumerate(raw):
        where = f"changes[{i}]"
        if not isinstance(item, dict):
            raise SyncProtocolError(f"{where}: expected an object")
        seq = item.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise SyncProtocolError(f"{where}: seq must be an integer")
        try:
            op = Op(str(item.get("op")))
        except ValueError as exc:
            raise SyncProtocolError(f"{where}: op must be upsert or delete, got {item.get('op')!r:.40}") from exc
        entity, key, data = _record(item, where)
        if op is Op.UPSERT and data is None:
            raise SyncProtocolError(f"{where}: an upsert must carry data")
        changes.append(Change(seq=seq, entity=entity, op=op, key=key, data=data if op is Op.UPSERT else None))
    changes.sort(key=lambda c: c.seq)
    return ChangesPage(changes=tuple(changes), cursor=cursor, more=more)


class SnapshotReader:
    """Turns the NDJSON snapshot, fed in chunks of any size, into records and its end.

    Feed :meth:`receive_data` each chunk; it returns the complete lines' events. Call
    :meth:`close` when the stream ends: it raises :class:`SyncProtocolError` unless the
    final line arrived and its ``count`` matched. Buffers at most one line
    (:data:`MAX_SNAPSHOT_LINE_BYTES`).
    """

    def __init__(self, *, max_line_bytes: int = MAX_SNAPSHOT_LINE_BYTES) -> None:
        self.max_line_bytes = max_line_bytes
        self.records = 0
        self.end: SnapshotEnd | None = None
        self._buffer = bytearray()

    def receive_data(self, data: bytes) -> list[SnapshotRecord | SnapshotEnd]:
        out: list[SnapshotRecord | SnapshotEnd] = []
        if b"\n" not in data:
            self._buffer += data
            if len(self._buffer) > self.max_line_bytes:
                raise SyncProtocolError(f"snapshot: a line longer than {self.max_line_bytes} bytes")
            return out
        # One split of the chunk (each line one copy), the partial line before it prepended.
        lines = (bytes(self._buffer) + data if self._buffer else data).split(b"\n")
        rest = lines.pop()
        for line in lines:
            if len(line) > self.max_line_bytes:
                raise SyncProtocolError(f"snapshot: a line longer than {self.max_line_bytes} bytes")
            event = self._line(line)
            if event is not None:
                out.append(event)
        self._buffer = bytearray(rest)
        if len(self._buffer) > self.max_line_bytes:
            raise SyncProtocolError(f"snapshot: a line longer than {self.max_line_bytes} bytes")
        return out

    def _line(self, line: bytes) -> SnapshotRecord | SnapshotEnd | None:
        if not line.strip():
            return None
        if self.end is not None:
            raise SyncProtocolError("snapshot: data after the final line")
        fast = _fast_record(line)
        if fast is not None:
            self.records += 1
            return fast
        where = f"snapshot line {self.records + 1}"
        obj = _json_object(line, where)
        if "cursor" in obj and "entity" not in obj:
            count = obj.get("count")
            if not isinstance(count, int) or isinstance(count, bool):
                raise SyncProtocolError("snapshot: the final line's count must be an integer")
            self.end = SnapshotEnd(cursor=_text(obj, "cursor", "snapshot final line"), count=count)
            return self.end
        entity, key, data = _record(obj, where)
        if data is None:
            raise SyncProtocolError(f"{where}: a snapshot record must carry data")
        self.records += 1
        return SnapshotRecord(entity=entity, key=key, data=_ASCII_JSON(data),
                              name=product_name(data) if entity == "product" else "")

    def close(self) -> SnapshotEnd:
        """The stream ended: the final line, or :class:`SyncProtocolError` if it is incomplete."""
        if self._buffer.strip():
            self.receive_data(b"\n")
        if self.end is None:
            raise SyncProtocolError(f"snapshot: the stream ended after {self.records} records without its final line")
        if self.end.count != self.records:
            raise SyncProtocolError(f"snapshot: the final line counts {self.end.count} records, {self.records} came")
        return self.end


_ASCII_JSON: Final = json.JSONEncoder(separators=(",", ":")).encode


def product_name(data: Mapping[str, Any]) -> str:
    """A product's display name from its data: "" unless a string; a lone surrogate (valid
    JSON, not valid UTF-8) replaced so SQLite can store it."""
    raw = data.get("name")
    name = raw if isinstance(raw, str) else ""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        name = name.encode("utf-8", "replace").decode("utf-8")
    return name


class _Line(msgspec.Struct, gc=False):
    """A snapshot record line as msgspec reads it: ``data`` left unparsed."""

    entity: str = ""
    key: str = ""
    data: msgspec.Raw = msgspec.Raw(b"")


class _Named(msgspec.Struct, gc=False):
    name: Any = None


_LINE: Final = msgspec.json.Decoder(_Line)
_NAMED: Final = msgspec.json.Decoder(_Named)


def _fast_record(line: bytes) -> SnapshotRecord | None:
    """The record on ``line`` read with msgspec, its data kept as sent; None for anything
    but a plain, valid record (the final line, or a line to refuse), which the careful
    path then reads and, if it must, refuses with its reason. Measured on the 100k
    catalog's 400,000 lines: parse plus the data's encoding again was most of the ingest's
    CPU (``scripts/bench snapshot``)."""
    try:
        parsed = _LINE.decode(line)
        entity, key, raw = parsed.entity, parsed.key, parsed.data
        text = str(raw, "utf-8")  # straight from msgspec's view of the line: no copy of the bytes first
        if not entity or not key or text[:1] != "{":
            return None
        if not (entity.isascii() and key.isascii()):
            entity.encode("utf-8")  # a lone surrogate (valid JSON) is no SQLite text
            key.encode("utf-8")
        name = product_name({"name": _NAMED.decode(raw).name}) if entity == "product" else ""
    except (msgspec.DecodeError, UnicodeError):  # ValidationError is a DecodeError
        return None
    return SnapshotRecord(entity=entity, key=key, data=text, name=name)


def parse_pairing(body: bytes) -> PairingAnswer:
    obj = _json_object(body, "pairing answer")
    services = obj.get("services")
    if not isinstance(services, dict):
        raise SyncProtocolError("pairing answer: services must be an object")
    secret = _text(services, "store_secret", "pairing answer: services")
    for name in ("orders", "support", "media", "logs"):
        if services.get(name) is not None and not isinstance(services[name], dict):
            raise SyncProtocolError(f"pairing answer: services.{name} must be an object or null")
    admin = obj.get("admin_token")
    if admin is not None and not (isinstance(admin, str) and ADMIN_TOKEN_RE.fullmatch(admin)):
        raise SyncProtocolError("pairing answer: admin_token must be 24 to 128 characters of A-Z a-z 0-9 - _ . ~")
    return PairingAnswer(store_id=_text(obj, "store_id", "pairing answer"), token=_text(obj, "token", "pairing answer"),
                         services=services, store_secret=secret, admin_token=admin or "")


def parse_events_answer(body: bytes) -> EventsAnswer:
    obj = _json_object(body, "events answer")
    accepted = obj.get("accepted", [])
    rejected = obj.get("rejected", [])
    if not isinstance(accepted, list) or not all(isinstance(i, str) for i in accepted):
        raise SyncProtocolError("events answer: accepted must be a list of ids")
    if not isinstance(rejected, list):
        raise SyncProtocolError("events answer: rejected must be a list")
    reasons: dict[str, str] = {}
    for i, item in enumerate(rejected):
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise SyncProtocolError(f"events answer: rejected[{i}] must be an object with an id")
        reason = item.get("reason")
        reasons[item["id"]] = reason if isinstance(reason, str) and reason else "rejected (no reason given)"
    return EventsAnswer(accepted=tuple(accepted), rejected=reasons)


def parse_error(body: bytes) -> tuple[str, str]:
    """(code, reason) of an error answer; best effort, never raises."""
    try:
        obj = _json_object(body[:65536], "error")
    except SyncProtocolError:
        text = body[:200].decode("utf-8", "replace").strip()
        return "", text
    code, reason = obj.get("error"), obj.get("reason")
    return (code if isinstance(code, str) else "", reason if isinstance(reason, str) else "")


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (RFC 9110 §10.2.3): delta-seconds or an
    HTTP-date. None when absent or unreadable; never negative; capped at
    :data:`RETRY_AFTER_MAX_S`."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(int(value)), RETRY_AFTER_MAX_S)
    parsed = parsedate_tz(value) if value.isascii() else None
    if parsed is None:
        return None
    try:
        when = mktime_tz(parsed)
    except (OverflowError, ValueError):
        return None
    return min(max(0.0, when - now), RETRY_AFTER_MAX_S)


# --- what an answer means ----------------------------------------------------------------


class CallVerdict(enum.StrEnum):
    OK = "ok"
    RETRY = "retry"  # try again later (after delay_s if given, else the backoff)
    REPAIR = "repair"  # the token is refused: the box must be paired again
    GONE = "gone"  # the cursor is too old: read the snapshot
    REFUSED = "refused"  # the request itself is wrong: retrying it unchanged is pointless


@attrs.frozen(kw_only=True)
class Decision:
    verdict: CallVerdict
    delay_s: float | None = None


# The table: status -> verdict. Anything not listed: 2xx OK, 5xx RETRY, other 4xx REFUSED.
_STATUS_TABLE: Final[Mapping[int, CallVerdict]] = {
    401: CallVerdict.REPAIR,  # token unknown or revoked
    403: CallVerdict.REPAIR,  # token of another store or appliance: a configuration error
    408: CallVerdict.RETRY,  # request timeout
    409: CallVerdict.RETRY,  # idempotency key still in flight (with Retry-After)
    410: CallVerdict.GONE,  # cursor expired
    425: CallVerdict.RETRY,  # too early
    429: CallVerdict.RETRY,  # rate limited (with Retry-After)
}


def judge(status: int, *, retry_after_s: float | None = None) -> Decision:
    """What the box does with an HTTP status (docs/cloud-contract.md)."""
    verdict = _STATUS_TABLE.get(status)
    if verdict is None:
        if 200 <= status < 300:
            verdict = CallVerdict.OK
        elif status >= 500:
            verdict = CallVerdict.RETRY
        else:
            verdict = CallVerdict.REFUSED
    return Decision(verdict=verdict, delay_s=retry_after_s if verdict is CallVerdict.RETRY else None)


class Pacer:
    """When one loop (pull, push, heartbeat) runs next.

    After a success: the loop's interval. After a failure: capped exponential backoff
    with jitter, but never sooner than the platform's Retry-After.
    """

    def __init__(self, *, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self._backoff = Backoff(initial_s, max(initial_s, max_s), rng=rng)

    @property
    def failures(self) -> int:
        return self._backoff.attempts

    def success(self, interval_s: float) -> float:
        self._backoff.reset()
        return interval_s

    def failure(self, retry_after_s: float | None = None) -> float:
        delay = self._backoff.next_delay()
        if retry_after_s is not None and math.isfinite(retry_after_s):
            delay = max(delay, min(retry_after_s, RETRY_AFTER_MAX_S))
        return delay


def batch_key(events: Sequence[tuple[str, str]], *, salt: int = 0) -> str:
    """The Idempotency-Key of a batch of (id, body) pairs: the same batch always gets the
    same key, so a retry after a lost answer replays the platform's first answer."""
    digest = hashlib.sha256(b"appliance-events-v1\n")
    if salt:
        digest.update(f"salt:{salt}\n".encode())
    for event_id, body in events:
        digest.update(event_id.encode("utf-8") + b"\x00" + body.encode("utf-8") + b"\n")
    return "b1-" + digest.hexdigest()[:48]


class Uplink:
    """How big the next events batch is, and what a refused batch becomes.

    A batch the platform refuses as a whole (400, 413, 422) is split in halves until the
    bad event is alone; then that event is marked rejected with the platform's reason.
    So one bad event can never wedge the queue, and good events around it still go.
    """

    def __init__(self, *, limit: int) -> None:
        self.max_limit = max(1, min(limit, EVENTS_PER_BATCH_MAX))
        self.limit = self.max_limit
        self.key_salt = 0
        self._rekeys = 0

    def sent(self) -> None:
        """A batch got an answer: go back to full batches."""
        self.limit = self.max_limit
        self._rekeys = 0

    def unanswered(self) -> None:
        """The platform answered without naming any event of the batch: the same key would
        only replay that answer, so the next try goes under a new key."""
        self.key_salt += 1

    def refused(self, batch_size: int, *, status: int, code: str) -> bool:
        """A batch was refused as a whole. True: reject its one event for good. False:
        release it and send smaller batches (or the same one under a new key)."""
        if status == 422 and code == "idempotency_key_reused" and self._rekeys < REKEYS_MAX:
            # Only possible if this batch's body changed under its key (a firmware
            # update that serialises differently): re-key, do not reject. Bounded, so a
            # platform that says it of everything cannot keep the box in a loop.
            self.key_salt += 1
            self._rekeys += 1
            return False
        if batch_size <= 1:
            return True
        self.limit = max(1, batch_size // 2)
        return False


# --- where the network path broke --------------------------------------------------------


def http_failure(target: str, status: int, *, code: str = "", reason: str = "") -> HopFailure:
    """A call that reached the platform and got an error status back."""
    words = f"HTTP {status}" + (f" {code}" if code else "") + (f": {reason}" if reason else "")
    fix: str
    if status in (401, 403):
        fix = Text("pair the box again (homepage, or `appliance pair CODE`); it keeps serving the shop meanwhile")
    elif status in (408, 409, 425, 429) or status >= 500:
        fix = Text("the platform is busy or down; the box retries by itself and keeps serving the shop")
    else:
        fix = FIXES[Hop.HTTP]
    return HopFailure(hop=Hop.HTTP, target=target, message=Text("{target} answered {words}", target=target,
                                                                words=words), fix=fix, status=status)


# --- what the loops last saw ------------------------------------------------------------


@attrs.define(kw_only=True)
class LoopStatus:
    """One sync loop's latest outcome (times are the wall clock, unix seconds)."""

    last_ok_at: float | None = None
    last_error: HopFailure | None = None
    failing_since: float | None = None
    last_failed_at: float | None = None
    failures: int = 0
    next_attempt_at: float | None = None

    def ok(self, now: float, next_at: float | None = None) -> None:
        self.last_ok_at = now
        self.last_error = None
        self.failing_since = None
        self.failures = 0
        self.next_attempt_at = next_at

    def failed(self, error: HopFailure, now: float, next_at: float | None = None) -> None:
        self.last_error = error
        self.last_failed_at = now
        if self.failing_since is None:
            self.failing_since = now
        self.failures += 1
        self.next_attempt_at = next_at

    def as_dict(self) -> dict[str, Any]:
        return {"last_ok_at": self.last_ok_at, "failing_since": self.failing_since, "failures": self.failures,
                "next_attempt_at": self.next_attempt_at,
                "last_error": self.last_error.as_dict() if self.last_error else None}


@attrs.define(kw_only=True)
class SyncStatus:
    """What the sync loops last saw: read by the homepage, /api/status, health, heartbeat."""

    pull: LoopStatus = attrs.field(factory=LoopStatus)
    push: LoopStatus = attrs.field(factory=LoopStatus)
    heartbeat: LoopStatus = attrs.field(factory=LoopStatus)
    # Rows of the snapshot being read right now (None: not reading one).
    snapshot_rows: int | None = None
    # Why the loops cannot run at all (a [wan] proxy or CA file that cannot be used).
    blocked: str = ""
    # Why the saved pairing cannot be used (an unreadable pairing file).
    pairing_problem: str = ""

    def last_error(self) -> HopFailure | None:
        """The most recent failure among the loops still failing (None: all fine)."""
        failing = [s for s in (self.pull, self.push, self.heartbeat) if s.last_error is not None]
        if not failing:
            return None
        latest = max(failing, key=lambda s: s.last_failed_at or 0.0)
        return latest.last_error
