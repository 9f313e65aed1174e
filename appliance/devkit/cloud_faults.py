"""Fault injection for the cloud simulator: a plan of rules, each used up after ``count`` hits.

Kinds (what the app does when a rule matches a request):

- ``status``: answer ``status`` at once (429 and 503 with ``Retry-After: retry_after``);
- ``latency``: wait ``delay_s`` before handling;
- ``drop``: handle the request (commit it), then cut the connection before the answer's body;
- ``cut``: cut a snapshot stream after ``after_lines`` lines, a blob after ``after_bytes``;
- ``corrupt``: flip the first byte of a blob's body (``/blob/`` paths);
- ``slow``: pace a blob's body to ``bytes_per_s``.

A rule matches when the request path starts with ``path`` and, if set, the method is ``method``.
"""

from __future__ import annotations

from typing import Any, Final

import attrs

from appliance.devkit.cloud_wire import CloudApiError, loads_strict

__all__ = ["FAULT_KINDS", "Fault", "FaultPlan", "parse_fault"]

FAULT_KINDS: Final = ("status", "latency", "drop", "cut", "corrupt", "slow")
# A test that needs more rules than this is a test of something else.
MAX_RULES: Final = 64
MAX_DELAY_S: Final = 60.0
_FIELDS: Final = frozenset({"kind", "path", "method", "count", "status", "retry_after", "delay_s", "after_lines",
                               "after_bytes", "bytes_per_s"})


@attrs.define(kw_only=True)
class Fault:
    kind: str
    path: str = "/v1/"
    method: str | None = None
    count: int = 1
    status: int = 503
    retry_after: int = 1
    delay_s: float = 0.0
    after_lines: int = 0
    after_bytes: int = 0
    bytes_per_s: int = 0

    def matches(self, method: str, path: str) -> bool:
        return path.startswith(self.path) and (self.method is None or self.method == method)

    def as_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


class FaultPlan:
    """The rules in force, in the order they were added."""

    def __init__(self) -> None:
        self._rules: list[Fault] = []

    def add(self, fault: Fault) -> None:
        if len(self._rules) >= MAX_RULES:
            raise CloudApiError(400, "invalid_body", f"at most {MAX_RULES} fault rules; DELETE /_sim/faults first")
        self._rules.append(fault)

    def clear(self) -> None:
        self._rules.clear()

    def take(self, kind: str, method: str, path: str) -> Fault | None:
        """The first rule of ``kind`` matching the request, counting this hit against it."""
        for rule in self._rules:
            if rule.kind == kind and rule.matches(method, path):
                rule.count -= 1
                if rule.count <= 0:
                    self._rules.remove(rule)
                return rule
        return None

    def pending(self) -> list[dict[str, Any]]:
        return [rule.as_json() for rule in self._rules]


def _int_field(body: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = body.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise CloudApiError(400, "invalid_body", f"{key}: must be an integer from {lo} to {hi}")
    return value


def parse_fault(raw: bytes) -> Fault:
    """``POST /_sim/faults``. ``{"status": 503, ...}`` without ``kind`` is a status rule."""
    body = loads_strict(raw)
    if not isinstance(body, dict):
        raise CloudApiError(400, "invalid_body", "the body must be an object")
    extra = sorted(set(body) - _FIELDS)
    if extra:
        raise CloudApiError(400, "invalid_body", f"unknown fields: {', '.join(extra)}")
    kind = body.get("kind", "status" if "status" in body else None)
    if kind not in FAULT_KINDS:
        raise CloudApiError(400, "invalid_body", f"kind: must be one of {', '.join(FAULT_KINDS)}")
    path = body.get("path", "/v1/")
    if not isinstance(path, str) or not path.startswith("/") or path.startswith("/_sim"):
        raise CloudApiError(400, "invalid_body", "path: must be a path prefix outside /_sim, like /v1/stores/")
    method = body.get("method")
    if method is not None and (not isinstance(method, str) or method.upper() != method or not method.isalpha()):
        raise CloudApiError(400, "invalid_body", "method: must be an HTTP method in capitals, like POST")
    delay = body.get("delay_s", 0.0)
    if not isinstance(delay, int | float) or isinstance(delay, bool) or not 0 <= delay <= MAX_DELAY_S:
        raise CloudApiError(400, "invalid_body", f"delay_s: must be a number from 0 to {MAX_DELAY_S}")
    return Fault(kind=kind, path=path, method=method,
                 count=_int_field(body, "count", 1, 1, 1_000_000),
                 status=_int_field(body, "status", 503, 400, 599),
                 retry_after=_int_field(body, "retry_after", 1, 0, 86_400),
                 delay_s=float(delay),
                 after_lines=_int_field(body, "after_lines", 0, 0, 10**9),
                 after_bytes=_int_field(body, "after_bytes", 0, 0, 10**12),
                 bytes_per_s=_int_field(body, "bytes_per_s", 0, 0, 10**10))
