"""Write the configuration's TOML shapes back as text (the standard library only reads TOML).

What the configuration holds: tables of strings, integers, floats, booleans and lists of
those, nested tables, and arrays of tables (``[[devices]]``). Anything else raises
``TypeError``; ``tomllib.loads(dumps(data)) == data`` for everything accepted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

__all__ = ["dumps"]

_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES: Final = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _string(value: str) -> str:
    out = []
    for ch in value:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, Sequence):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _is_table_array(value: Any) -> bool:
    return (isinstance(value, Sequence) and not isinstance(value, str) and bool(value)
            and all(isinstance(v, Mapping) for v in value))


def _table(data: Mapping[str, Any], path: tuple[str, ...], out: list[str]) -> None:
    scalars = [(k, v) for k, v in data.items() if not isinstance(v, Mapping) and not _is_table_array(v)]
    for key, value in scalars:
        out.append(f"{_key(key)} = {_value(value)}")
    for key, value in data.items():
        if isinstance(value, Mapping):
            sub = (*path, key)
            if out:
                out.append("")
            out.append("[" + ".".join(_key(k) for k in sub) + "]")
            _table(value, sub, out)
        elif _is_table_array(value):
            sub = (*path, key)
            for item in value:
                if out:
                    out.append("")
                out.append("[[" + ".".join(_key(k) for k in sub) + "]]")
                _table(item, sub, out)


def dumps(data: Mapping[str, Any]) -> str:
    """``data`` as TOML text, tables in the order given."""
    if not isinstance(data, Mapping):
        raise TypeError("the top level of a TOML document is a table")
    out: list[str] = []
    _table(data, (), out)
    return "\n".join(out) + ("\n" if out else "")
