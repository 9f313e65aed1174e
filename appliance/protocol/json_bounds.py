"""JSON from the LAN, parsed within bounds: nesting depth, integer size, finite numbers.

``json.loads`` alone turns hostile input into a 500: a body nested 100,000 deep raises
``RecursionError`` from the C scanner, a 5,000-digit integer raises ``ValueError`` (Python's
4,300-digit guard), and ``1e999`` quietly becomes ``inf``. :func:`loads_bounded` checks
the nesting before parsing (one linear pass over strings and brackets, no recursion) and
each number as it is parsed, and raises :class:`JsonBoundsError` naming the path of the
value at fault (``$.lines[3].modifiers``), so the caller answers 400 with that path.

Exceptions: :class:`JsonBoundsError` (``path``, ``reason``), a ``ValueError``; input that
is not JSON at all raises :class:`json.JSONDecodeError` (or ``UnicodeDecodeError``) as
``json.loads`` does.
"""

from __future__ import annotations

import itertools
import json
import math
import operator
import re
from collections.abc import Iterable
from typing import Any, Final

__all__ = ["MAX_DEPTH", "MAX_INT_DIGITS", "JsonBoundsError", "loads_bounded"]

# The deepest body the box takes (an order's lines' modifiers' options are 5 deep); 32
# leaves room for what a device adds and stays far from the interpreter's recursion limit.
MAX_DEPTH: Final = 32
# A signed 64-bit integer has at most 19 digits; SQLite and the platform store no more.
MAX_INT_DIGITS: Final = 19
_INT64: Final = 2**63

# Strings (with their escapes) are skipped whole; brackets, commas and colons are structure.
_STRING: Final = rb'"[^"\\]*(?:\\.[^"\\]*)*"'
_TOKEN: Final = re.compile(_STRING + rb"|[\[\]{},]", re.DOTALL)
_STRINGS: Final = re.compile(_STRING, re.DOTALL)
# For the fast depth count: an opening bracket weighs 2, a closing one 0, all else is deleted.
_WEIGHT: Final = bytes(2 if c in b"[{" else 0 for c in range(256))
# Numbers that may be out of bounds: long digit runs, exponents, NaN/Infinity. Only bodies
# with one pay for the per-number checks.
_SUSPECT_NUMBER: Final = re.compile(rb"[0-9]{%d}|[eE]|NaN|Infinity" % MAX_INT_DIGITS)
_NOT_BRACKETS: Final = bytes(c for c in range(256) if c not in b"[]{}")


class JsonBoundsError(ValueError):
    """Valid-looking JSON beyond the box's bounds; ``path`` is where (``$`` is the top)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


class _Big:
    """A number parsed out of bounds, replaced after parsing by its path in the error."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _path(stack: list[list[Any]]) -> str:
    out = "$"
    for kind, where in stack:
        if kind == "[":
            out += f"[{where}]"
        elif where is not None:
            out += f".{where}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", where) else f"[{json.dumps(where)}]"
    return out


def _max_depth(outside_strings: bytes) -> int:
    """The deepest nesting, counted at C speed over the text outside strings: brackets kept,
    and the running sum of (weight - 1) is the depth after each bracket."""
    brackets = outside_strings.translate(_WEIGHT, _NOT_BRACKETS)
    if not brackets:
        return 0
    depths: Iterable[int] = map(operator.sub, itertools.accumulate(brackets), range(1, len(brackets) + 1))
    return max(depths)


def _check_depth(data: bytes, outside_strings: bytes, max_depth: int) -> None:
    if _max_depth(outside_strings) <= max_depth:
        return
    # Too deep: a slower pass finds where, to name the path.
    # stack items: ["[", index] or ["{", key or None]; an object expects a key after { and ,
    stack: list[list[Any]] = []
    expect_key = False
    for match in _TOKEN.finditer(data):
        token = match.group()
        first = token[:1]
        if first == b'"':
            if expect_key and stack and stack[-1][0] == "{":
                try:
                    stack[-1][1] = json.loads(token)
                except ValueError:
                    stack[-1][1] = "?"
                expect_key = False
        elif first in (b"[", b"{"):
            if len(stack) >= max_depth:
                raise JsonBoundsError(_path(stack), f"nested deeper than {max_depth} levels")
            stack.append(["[", 0] if first == b"[" else ["{", None])
            expect_key = first == b"{"
        elif first in (b"]", b"}"):
            if stack:
                stack.pop()
            expect_key = False
        elif first == b"," and stack:
            if stack[-1][0] == "[":
                stack[-1][1] += 1
            else:
                expect_key = True


def _parse_int(text: str) -> int | _Big:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        return _Big(f"integer of {len(text.lstrip('-'))} digits; at most {MAX_INT_DIGITS} are taken")
    value = int(text)
    if not -_INT64 <= value < _INT64:
        return _Big("integer beyond 64 bits")
    return value


def _parse_float(text: str) -> float | _Big:
    value = float(text)
    if not math.isfinite(value):
        return _Big(f"number {text[:20]}{'...' if len(text) > 20 else ''} is too large to represent")
    return value


def _not_json_constant(name: str) -> _Big:
    return _Big(f"{name} is not JSON")


def _find_big(value: Any, path: str) -> JsonBoundsError | None:
    # Iterative: the depth check already bounded the nesting, but a long list is wide.
    todo: list[tuple[Any, str]] = [(value, path)]
    while todo:
        item, where = todo.pop()
        if isinstance(item, _Big):
            return JsonBoundsError(where, item.reason)
        if isinstance(item, dict):
            todo.extend((v, _path([["{", k]]).replace("$", where, 1)) for k, v in item.items())
        elif isinstance(item, list):
            todo.extend((v, f"{where}[{i}]") for i, v in enumerate(item))
    return None


def loads_bounded(data: bytes | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """``data`` parsed as JSON within the bounds above, or :class:`JsonBoundsError`."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    outside_strings = _STRINGS.sub(b"", raw)
    _check_depth(raw, outside_strings, max_depth)
    if not _SUSPECT_NUMBER.search(outside_strings):
        return json.loads(raw)  # no long digit run, exponent or constant: the C fast path
    found: list[bool] = []

    def mark(result: Any) -> Any:
        if isinstance(result, _Big):
            found.append(True)
        return result

    value = json.loads(raw, parse_int=lambda t: mark(_parse_int(t)), parse_float=lambda t: mark(_parse_float(t)),
                       parse_constant=lambda t: mark(_not_json_constant(t)))
    if found:
        error = _find_big(value, "$")
        if error is not None:
            raise error
    return value
