"""Parsing and validation of what the appliance sends the sync API. Pure: bytes in, values out.

Exceptions::

    CloudApiError            an answer other than 200: status, error code, reason, headers, extra
    └── (raised with status 400 for a body that is not what docs/cloud-contract.md says)

A single event that fails validation is not an exception: :func:`parse_events` returns a
:class:`Rejection` for it, so the rest of the batch is still accepted.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Final, NoReturn

import attrs

from appliance.devkit.cloud_catalog import ENTITIES, canonical_json
from appliance.protocol.events import EventType

__all__ = [
    "EVENT_TYPES",
    "MAX_EVENTS",
    "MAX_LIMIT",
    "CloudApiError",
    "Event",
    "FeedChange",
    "PairRequest",
    "Rejection",
    "is_id",
    "loads_strict",
    "parse_cursor",
    "parse_events",
    "parse_heartbeat",
    "parse_limit",
    "parse_mutation",
    "parse_pair",
]

MAX_EVENTS: Final = 500
MAX_LIMIT: Final = 1000
DEFAULT_LIMIT: Final = 500
MAX_SALE_LINES: Final = 500
_MAX_FIELD_CHARS: Final = 128
_ID_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}\Z")
_CURRENCY_RE: Final = re.compile(r"[A-Z]{3}\Z")

ORDER_STATUSES: Final = ("received", "accepted", "preparing", "ready", "collected", "delivered",
                         "cancelled", "rejected")
DEVICE_STATUSES: Final = ("online", "offline", "degraded")
HEALTH_STATUSES: Final = ("ok", "warn", "fail")
EVENT_TYPES: Final = tuple(str(t) for t in EventType)
_EVENT_FIELDS: Final = frozenset({"id", "type", "at", "data"})
_HEARTBEAT_REQUIRED: Final = frozenset({"firmware", "uptime_s", "health", "queues"})
_HEARTBEAT_FIELDS: Final = _HEARTBEAT_REQUIRED | {"at", "appliance_id", "sync", "update"}


class CloudApiError(Exception):
    """An error answer: ``{"error": error, "reason": reason, **extra}`` with ``status``."""

    def __init__(self, status: int, error: str, reason: str, *,
                 headers: Mapping[str, str] | None = None, extra: Mapping[str, Any] | None = None) -> None:
        self.status, self.error, self.reason = status, error, reason
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})
        super().__init__(f"{status} {error}: {reason}")

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "reason": self.reason, **self.extra}


class _Invalid(Exception):
    """One field is wrong; ``path`` names it (``data.lines[0].qty``)."""

    def __init__(self, path: str, message: str) -> None:
        self.path, self.message = path, message
        super().__init__(f"{path}: {message}" if path else message)


def _invalid(path: str, message: str) -> NoReturn:
    raise _Invalid(path, message)


def _bad_body(reason: str) -> CloudApiError:
    return CloudApiError(400, "invalid_body", reason)


def is_id(value: object) -> bool:
    """An event id, Idempotency-Key or request id: 1..128 of ``A-Z a-z 0-9 . _ : -``."""
    return isinstance(value, str) and _ID_RE.match(value) is not None


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def loads_strict(raw: bytes) -> Any:
    """JSON as RFC 8259 says: UTF-8, no NaN/Infinity, no duplicate keys. Raises CloudApiError 400."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant,
                          object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise _bad_body("the body is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _bad_body(f"the body is not JSON: {exc}") from None


def _object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        _invalid(path, "must be an object")
    return value


def _str(obj: Mapping[str, Any], key: str, path: str, *, required: bool = True) -> str | None:
    if key not in obj:
        if required:
            _invalid(f"{path}{key}", "is required")
        return None
    value = obj[key]
    if not isinstance(value, str) or not value or len(value) > _MAX_FIELD_CHARS:
        _invalid(f"{path}{key}", f"must be a non-empty string of at most {_MAX_FIELD_CHARS} characters")
    return value


def _int(obj: Mapping[str, Any], key: str, path: str, *, minimum: int | None = None,
         nonzero: bool = False) -> int:
    if key not in obj:
        _invalid(f"{path}{key}", "is required")
    value = obj[key]
    # bool is an int subclass: true is not a quantity.
    if not isinstance(value, int) or isinstance(value, bool):
        _invalid(f"{path}{key}", "must be an integer")
    if minimum is not None and value < minimum:
        _invalid(f"{path}{key}", f"must be >= {minimum}")
    if nonzero and value == 0:
        _invalid(f"{path}{key}", "must not be 0")
    return value


def _choice(obj: Mapping[str, Any], key: str, path: str, choices: Sequence[str]) -> str:
    value = _str(obj, key, path)
    if value not in choices:
        _invalid(f"{path}{key}", f"must be one of {', '.join(choices)}")
    assert value is not None
    return value


def _timestamp(value: Any, path: str) -> str:
    if not isinstance(value, str) or len(value) > 64:
        _invalid(path, "must be an RFC 3339 timestamp string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        _invalid(path, "must be an RFC 3339 timestamp (2025-03-01T09:30:00Z)")
    if parsed.tzinfo is None:
        _invalid(path, "must carry a UTC offset (Z or +01:00)")
    return value


# -- pairing -----------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class PairRequest:
    code: str
    appliance_id: str
    firmware: str


def parse_pair(raw: bytes) -> PairRequest:
    obj = loads_strict(raw)
    try:
        body = _object(obj, "")
        extra = sorted(set(body) - {"code", "appliance_id", "firmware"})
        if extra:
            _invalid("", f"unknown fields: {', '.join(extra)}")
        values = [_str(body, k, "") for k in ("code", "appliance_id", "firmware")]
    except _Invalid as exc:
        raise _bad_body(str(exc) if exc.path else f"the body {exc.message}") from None
    code, appliance_id, firmware = (v for v in values if v is not None)
    return PairRequest(code=code, appliance_id=appliance_id, firmware=firmware)


# -- events ------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Event:
    """A valid event; ``canonical`` is its content, compared when an id comes again."""

    index: int
    id: str
    type: str
    at: str
    data: dict[str, Any]
    canonical: str

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "at": self.at, "data": self.data}


@attrs.frozen(kw_only=True)
class Rejection:
    index: int
    id: str | None
    reason: str

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "index": self.index, "reason": self.reason}


def _check_sale(data: dict[str, Any]) -> None:
    _str(data, "device_id", "data.")
    currency = _str(data, "currency", "data.")
    if currency is not None and not _CURRENCY_RE.match(currency):
        _invalid("data.currency", "must be 3 capital letters (ISO 4217)")
    _int(data, "total_cents", "data.")
    lines = data.get("lines")
    if not isinstance(lines, list) or not 1 <= len(lines) <= MAX_SALE_LINES:
        _invalid("data.lines", f"must be a list of 1 to {MAX_SALE_LINES} lines")
    for i, line in enumerate(lines):
        path = f"data.lines[{i}]."
        _object(line, path[:-1])
        _str(line, "sku", path)
        _int(line, "qty", path, nonzero=True)
        _int(line, "unit_price_cents", path, minimum=0)
    if "payments" in data:
        payments = data["payments"]
        if not isinstance(payments, list) or len(payments) > MAX_SALE_LINES:
            _invalid("data.payments", f"must be a list of at most {MAX_SALE_LINES} payments")
        for i, payment in enumerate(payments):
            path = f"data.payments[{i}]."
            _object(payment, path[:-1])
            _str(payment, "method", path)
            _int(payment, "amount_cents", path)


def _check_order_status(data: dict[str, Any]) -> None:
    _str(data, "order_id", "data.")
    _choice(data, "status", "data.", ORDER_STATUSES)
    _str(data, "reason", "data.", required=False)
    _str(data, "device_id", "data.", required=False)


def _check_device_status(data: dict[str, Any]) -> None:
    _str(data, "device_id", "data.")
    _choice(data, "status", "data.", DEVICE_STATUSES)
    _str(data, "detail", "data.", required=False)
    _str(data, "kind", "data.", required=False)


_CHECKS: Final = {"sale": _check_sale, "order.status": _check_order_status, "device.status": _check_device_status}


def validate_event(value: Any, index: int) -> Event | Rejection:
    """One element of ``events``: an :class:`Event`, or a :class:`Rejection` with the reason."""
    event_id = value.get("id") if isinstance(value, dict) else None
    safe_id = event_id if is_id(event_id) else None
    try:
        body = _object(value, f"events[{index}]")
        extra = sorted(set(body) - _EVENT_FIELDS)
        if extra:
            _invalid("", f"unknown fields: {', '.join(extra)}")
        if not is_id(event_id):
            _invalid("id", "is required: 1 to 128 characters of A-Z a-z 0-9 . _ : -")
        kind = body.get("type")
        if kind not in _CHECKS:
            _invalid("type", f"must be one of {', '.join(EVENT_TYPES)}")
        if "at" not in body:
            _invalid("at", "is required")
        at = _timestamp(body["at"], "at")
        data = _object(body.get("data"), "data")
        _CHECKS[kind](data)
    except _Invalid as exc:
        return Rejection(index=index, id=safe_id, reason=str(exc))
    assert isinstance(event_id, str)
    return Event(index=index, id=event_id, type=kind, at=at, data=data,
                 canonical=canonical_json({"id": event_id, "type": kind, "at": at, "data": data}))


def parse_events(raw: bytes) -> list[Event | Rejection]:
    """The body of ``POST .../events``. Raises CloudApiError 400 when the request as a whole is bad."""
    obj = loads_strict(raw)
    if not isinstance(obj, dict):
        raise _bad_body("the body must be an object {\"events\": [...]}")
    extra = sorted(set(obj) - {"events"})
    if extra:
        raise _bad_body(f"unknown fields: {', '.join(extra)}")
    events = obj.get("events")
    if not isinstance(events, list):
        raise _bad_body("events: is required, a list")
    if len(events) > MAX_EVENTS:
        raise _bad_body(f"events: at most {MAX_EVENTS} per request, got {len(events)}")
    return [validate_event(value, i) for i, value in enumerate(events)]


# -- heartbeat ---------------------------------------------------------------------------------


def parse_heartbeat(raw: bytes) -> dict[str, Any]:
    obj = loads_strict(raw)
    try:
        body = _object(obj, "")
        extra = sorted(set(body) - _HEARTBEAT_FIELDS)
        if extra:
            _invalid("", f"unknown fields: {', '.join(extra)}")
        _str(body, "firmware", "")
        uptime = body.get("uptime_s")
        if (not isinstance(uptime, int | float) or isinstance(uptime, bool) or not math.isfinite(uptime)
                or uptime < 0):
            _invalid("uptime_s", "is required, a number >= 0")
        health = _object(body.get("health"), "health")
        _choice(health, "status", "health.", HEALTH_STATUSES)
        if "checks" in health:
            checks = health["checks"]
            if not isinstance(checks, list):
                _invalid("health.checks", "must be a list")
            for i, check in enumerate(checks):
                path = f"health.checks[{i}]."
                _object(check, path[:-1])
                _str(check, "name", path)
                _choice(check, "status", path, HEALTH_STATUSES)
        queues = _object(body.get("queues"), "queues")
        for name in queues:
            _int(queues, name, "queues.", minimum=0)
        if "at" in body:
            _timestamp(body["at"], "at")
        _str(body, "appliance_id", "", required=False)
        if "sync" in body:
            _object(body["sync"], "sync")
        if "update" in body:
            _object(body["update"], "update")
    except _Invalid as exc:
        raise _bad_body(str(exc) if exc.path else f"the body {exc.message}") from None
    return body


# -- the feed ----------------------------------------------------------------------------------


def parse_cursor(value: str | None) -> int:
    """The feed position a cursor names; ``None`` (omitted) is the start. Raises CloudApiError 400."""
    if value is None:
        return 0
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        raise CloudApiError(400, "invalid_cursor", f"not a cursor from this API: {value[:40]!r}")
    return int(value)


def parse_limit(value: str | None) -> int:
    if value is None:
        return DEFAULT_LIMIT
    if not value.isascii() or not value.isdigit() or len(value) > 4 or not 1 <= int(value) <= MAX_LIMIT:
        raise CloudApiError(400, "invalid_limit", f"limit must be an integer from 1 to {MAX_LIMIT}, got {value[:40]!r}")
    return int(value)


@attrs.frozen(kw_only=True)
class FeedChange:
    """One entry of the feed; ``data`` is None for a delete."""

    seq: int
    entity: str
    key: str
    data: dict[str, Any] | None

    def as_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "entity": self.entity, "op": "upsert" if self.data is not None else "delete",
                "key": self.key, "data": self.data}


def parse_mutation(raw: bytes) -> list[tuple[str, str, dict[str, Any] | None]]:
    """``POST /_sim/mutate``: ``{"upserts": [{entity, key, data}], "deletes": [{entity, key}]}``."""
    obj = loads_strict(raw)
    out: list[tuple[str, str, dict[str, Any] | None]] = []
    try:
        body = _object(obj, "")
        extra = sorted(set(body) - {"upserts", "deletes"})
        if extra:
            _invalid("", f"unknown fields: {', '.join(extra)}")
        for field in ("upserts", "deletes"):
            items = body.get(field, [])
            if not isinstance(items, list):
                _invalid(field, "must be a list")
            for i, item in enumerate(items):
                path = f"{field}[{i}]."
                _object(item, path[:-1])
                _choice(item, "entity", path, ENTITIES)
                key = _str(item, "key", path)
                assert key is not None
                if field == "upserts":
                    out.append((item["entity"], key, _object(item.get("data"), f"{path}data")))
                else:
                    out.append((item["entity"], key, None))
    except _Invalid as exc:
        raise _bad_body(str(exc) if exc.path else f"the body {exc.message}") from None
    return out
