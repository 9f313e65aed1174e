"""Remote support requests (the support queue), sans I/O: parsing and their bounds.

A request is a JSON object ``{"request_id": "...", "kind": "...", "args": {...}}``:

| kind | args | what the box does |
|---|---|---|
| ``health`` | none | runs every health check and returns them |
| ``diagnostics`` | none | versions, uptime, services, queue depths, last errors |
| ``resync`` | ``full`` (bool, default false) | asks the sync service to pull now; ``full`` re-reads the snapshot |
| ``log_level`` | ``level`` (debug ... error), ``duration_s`` (<= 1 h) | that level for that long, then back |
| ``bundle`` | ``logs`` (records, default 5000, <= 100000) | uploads the diagnostics bundle (size-capped) |

Exceptions: :class:`SupportRequestError` (the reason says what is wrong; the message is
dead-lettered with it).
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from typing import Any, Final

import attrs

__all__ = ["BUNDLE_LOGS_DEFAULT", "BUNDLE_LOGS_MAX", "LOG_LEVEL_MAX_S", "MAX_REQUEST_BYTES", "SupportKind",
           "SupportRequest", "SupportRequestError", "parse_request"]

MAX_REQUEST_BYTES: Final = 16 * 1024
# A raised log level is for a session, not for good: one hour at most.
LOG_LEVEL_MAX_S: Final = 3600.0
LOG_LEVEL_DEFAULT_S: Final = 600.0
LEVELS: Final = ("debug", "info", "warning", "error")
BUNDLE_LOGS_DEFAULT: Final = 5000
BUNDLE_LOGS_MAX: Final = 100_000
# The reply path's rule (docs/cloud-contract.md, "Support replies").
_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class SupportRequestError(ValueError):
    """Not a support request this box understands."""


class SupportKind(enum.StrEnum):
    HEALTH = "health"
    DIAGNOSTICS = "diagnostics"
    RESYNC = "resync"
    LOG_LEVEL = "log_level"
    BUNDLE = "bundle"


@attrs.frozen(kw_only=True)
class SupportRequest:
    request_id: str
    kind: SupportKind
    args: Mapping[str, Any] = attrs.field(factory=dict)


def _check_args(kind: SupportKind, args: Mapping[str, Any]) -> dict[str, Any]:
    allowed = {SupportKind.RESYNC: {"full"}, SupportKind.LOG_LEVEL: {"level", "duration_s"},
               SupportKind.BUNDLE: {"logs"}}.get(kind, set())
    extra = sorted(set(args) - allowed)
    if extra:
        raise SupportRequestError(f"args: unknown key(s) {', '.join(extra)} for {kind}")
    if kind is SupportKind.RESYNC:
        full = args.get("full", False)
        if not isinstance(full, bool):
            raise SupportRequestError(f"args.full: must be true or false, got {full!r}")
        return {"full": full}
    if kind is SupportKind.LOG_LEVEL:
        level = args.get("level")
        if level not in LEVELS:
            raise SupportRequestError(f"args.level: must be one of {', '.join(LEVELS)}, got {level!r}")
        duration = args.get("duration_s", LOG_LEVEL_DEFAULT_S)
        if isinstance(duration, bool) or not isinstance(duration, int | float) or not (
                0 < duration <= LOG_LEVEL_MAX_S):
            raise SupportRequestError(f"args.duration_s: must be a number of seconds in (0, {LOG_LEVEL_MAX_S:g}], "
                                      f"got {duration!r}")
        return {"level": level, "duration_s": float(duration)}
    if kind is SupportKind.BUNDLE:
        logs = args.get("logs", BUNDLE_LOGS_DEFAULT)
        if isinstance(logs, bool) or not isinstance(logs, int) or not 0 <= logs <= BUNDLE_LOGS_MAX:
            raise SupportRequestError(f"args.logs: a whole number of records from 0 to {BUNDLE_LOGS_MAX}, "
                                      f"got {logs!r}")
        return {"logs": logs}
    return {}


def parse_request(body: bytes) -> SupportRequest:
    if len(body) > MAX_REQUEST_BYTES:
        raise SupportRequestError(f"the request is {len(body)} bytes; at most {MAX_REQUEST_BYTES}")
    try:
        data: Any = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise SupportRequestError(f"the request is not UTF-8 text: {exc.reason}") from exc
    except (ValueError, RecursionError) as exc:
        raise SupportRequestError(f"the request is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise SupportRequestError(f"the request must be a JSON object, got {type(data).__name__}")
    extra = sorted(set(data) - {"request_id", "kind", "args"})
    if extra:
        raise SupportRequestError(f"unknown key(s) {', '.join(extra)}; a request has request_id, kind, args")
    request_id = data.get("request_id")
    if not isinstance(request_id, str) or not _REQUEST_ID.fullmatch(request_id):
        raise SupportRequestError(f"request_id: must be 1 to 128 of A-Z a-z 0-9 . _ : -, got {request_id!r}"[:300])
    try:
        kind = SupportKind(str(data.get("kind")))
    except ValueError:
        raise SupportRequestError(f"kind: must be one of {', '.join(SupportKind)}, got {data.get('kind')!r}"[:300]
                                  ) from None
    args = data.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise SupportRequestError(f"args: must be an object, got {type(args).__name__}")
    return SupportRequest(request_id=request_id, kind=kind, args=_check_args(kind, args))
