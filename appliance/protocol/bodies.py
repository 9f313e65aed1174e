"""One definition per JSON body: validation, encoding and JSON Schema from the same class.

A body is a :class:`Body` (a frozen msgspec ``Struct``); its fields' types say the shape
(msgspec checks them strictly: no ``"2"`` for 2, no ``true`` for 1, unknown fields
refused), and the :class:`Rule` objects in their ``Annotated`` metadata say the values
(length, range, pattern, printable text). A rule is one object that both checks a value,
with the message the API has always given (``lines[0].qty: must not be 0``), and states
itself as JSON Schema keywords, so the served schema (``docs/store-api.md``) and the
check cannot disagree. Encoding is msgspec's, from the same class (fields left at their
default are left out).

- :func:`convert`: decoded JSON -> a body, or :class:`InvalidBody` with path-named lines.
- :func:`schema_components`: the JSON Schema of bodies, rules included (``$ref`` to
  ``#/components/schemas/<Name>``, as OpenAPI 3.1 wants).

Exceptions: :class:`InvalidBody` (``errors``: one path-named line per problem).
"""

from __future__ import annotations

import re
import typing
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Final, TypeVar

import msgspec

__all__ = [
    "REF_PREFIX",
    "Body",
    "Count",
    "InvalidBody",
    "Matches",
    "Range",
    "Rule",
    "Text",
    "convert",
    "schema_components",
]

B = TypeVar("B", bound="Body")
REF_PREFIX: Final = "#/components/schemas/"


class InvalidBody(ValueError):
    """A body that is not valid; ``errors`` has one path-named line per problem."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(self.errors))


class Rule:
    """What a field's value must be: :meth:`check` says why not (None: fine), and
    :meth:`schema` the same as JSON Schema keywords."""

    def check(self, value: Any) -> str | None:
        raise NotImplementedError

    def schema(self) -> dict[str, Any]:
        raise NotImplementedError


# Text from devices is shown on the homepage, printed on tickets and sent to the platform:
# no control characters (NUL...), no invisible formatting (bidi overrides such as U+202E,
# zero-width characters), no unassigned or private-use code points. A note may have line
# breaks and tabs; names and codes may not, nor leading or trailing spaces.
_REFUSED_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _bad_character(value: str, *, multiline: bool) -> str | None:
    for i, ch in enumerate(value):
        if multiline and ch in "\n\t":
            continue
        if unicodedata.category(ch) in _REFUSED_CATEGORIES:
            return f"character {i} is U+{ord(ch):04X} ({unicodedata.name(ch, 'a control or unassigned character')})"
    if not multiline and value != value.strip():
        return "leading or trailing spaces"
    return None


def _valid_unicode(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Text(Rule):
    """Printable text of at most ``max_chars`` characters (docs/hardening.md)."""

    def __init__(self, max_chars: int, *, empty: bool = False, multiline: bool = False) -> None:
        self.max_chars, self.empty, self.multiline = max_chars, empty, multiline

    def check(self, value: Any) -> str | None:
        if not _valid_unicode(value):
            return "not valid Unicode text (a lone surrogate)"
        if not value and not self.empty:
            return "must not be empty"
        if len(value) > self.max_chars:
            return f"at most {self.max_chars} characters, got {len(value)}"
        bad = _bad_character(value, multiline=self.multiline)
        if bad is not None:
            return f"printable characters only (docs/hardening.md); {bad}"
        return None

    def schema(self) -> dict[str, Any]:
        what = "printable text" + (" (line breaks and tabs allowed)" if self.multiline else
                                   ", no leading or trailing spaces")
        return {"minLength": 0 if self.empty else 1, "maxLength": self.max_chars, "description": what}


class Matches(Rule):
    """Text that matches ``pattern`` whole; ``rule`` says it in words for the error."""

    def __init__(self, pattern: str, *, rule: str, max_chars: int | None = None, empty: bool = False,
                 template: str = "{rule}, got {value!r:.40}") -> None:
        self.regex = re.compile(pattern)
        self.rule, self.max_chars, self.empty, self.template = rule, max_chars, empty, template

    def check(self, value: Any) -> str | None:
        if not _valid_unicode(value):
            return "not valid Unicode text (a lone surrogate)"
        if self.empty and not value:
            return None
        too_long = self.max_chars is not None and len(value) > self.max_chars
        if too_long or not self.regex.fullmatch(value):
            return self.template.format(rule=self.rule, value=value)
        return None

    def schema(self) -> dict[str, Any]:
        pattern = f"^(?:{self.regex.pattern})$"
        out: dict[str, Any] = {"pattern": f"^$|{pattern}" if self.empty else pattern, "description": self.rule}
        if self.max_chars is not None:
            out["maxLength"] = self.max_chars
        return out


class Range(Rule):
    """An integer from ``lo`` to ``hi``, and not 0 if ``nonzero``."""

    def __init__(self, lo: int, hi: int, *, nonzero: bool = False) -> None:
        self.lo, self.hi, self.nonzero = lo, hi, nonzero

    def check(self, value: Any) -> str | None:
        if not self.lo <= value <= self.hi:
            return f"must be between {self.lo} and {self.hi}, got {value}"
        if self.nonzero and value == 0:
            return "must not be 0"
        return None

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"minimum": self.lo, "maximum": self.hi}
        if self.nonzero:
            out["not"] = {"const": 0}
        return out


class Count(Rule):
    """A list of ``lo`` to ``hi`` items."""

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi

    def check(self, value: Any) -> str | None:
        if not self.lo <= len(value) <= self.hi:
            return f"must hold {self.lo} to {self.hi} items, got {len(value)}"
        return None

    def schema(self) -> dict[str, Any]:
        return {"minItems": self.lo, "maxItems": self.hi}


def _rules_of(cls: type) -> dict[str, tuple[Rule, ...]]:
    hints = typing.get_type_hints(cls, include_extras=True)
    out: dict[str, tuple[Rule, ...]] = {}
    for name in getattr(cls, "__struct_fields__", ()):
        hint = hints[name]
        rules = tuple(m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Rule))
        if rules:
            out[name] = rules
    return out


class Body(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """A JSON body: fields checked by type (msgspec) and by their rules (here), all at once."""

    _rules: ClassVar[dict[type, dict[str, tuple[Rule, ...]]]] = {}

    def __post_init__(self) -> None:
        cls = type(self)
        rules = Body._rules.get(cls)
        if rules is None:
            rules = Body._rules[cls] = _rules_of(cls)
        problems = [f"{name}: {message}" for name, field_rules in rules.items() for rule in field_rules
                    if (message := rule.check(getattr(self, name))) is not None]
        if not problems:  # rules across fields assume each field is valid on its own
            problems.extend(self.check())
        if problems:
            # msgspec adds the path of this object (`$.lines[0]`); each line names its field.
            raise ValueError("\n".join(problems))

    def check(self) -> Iterable[str]:
        """Rules across fields (``field: message`` lines), once every field passed its own; none
        by default."""
        return ()


# --- decoding errors as path-named lines -------------------------------------------------------

_AT: Final = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_EXPECTED: Final = re.compile(r"^Expected `(?P<want>[^`]+)`, got `(?P<got>[^`]+)`$")
_WORDS: Final = {"int": "integer", "str": "string", "bool": "boolean", "float": "number", "array": "list",
                 "object": "object", "null": "null", "number": "number"}


def _json_type(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "object",
             tuple: "list"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _lines(exc: msgspec.ValidationError) -> list[str]:
    m = _AT.match(str(exc))
    assert m is not None  # the pattern matches any text
    message, path = m["message"], (m["path"] or "").lstrip(".")
    if (missing := re.fullmatch(r"Object missing required field `(.+)`", message)) is not None:
        return [f"{_join(path, missing[1])}: required field is missing"]
    if (unknown := re.fullmatch(r"Object contains unknown field `(.+)`", message)) is not None:
        return [f"{path or '(body)'}: unknown field(s) {unknown[1]}"]
    if (expected := _EXPECTED.fullmatch(message)) is not None:
        want = _WORDS.get(expected["want"], expected["want"])
        got = _WORDS.get(expected["got"], expected["got"])
        want = {"object": "an object", "list": "a list"}.get(want, want)
        return [f"{path or '(body)'}: expected {want}, got {got}"]
    if "\n" in message or re.match(r"^[A-Za-z_]+: ", message):
        return [_join(path, line) for line in message.split("\n")]  # a Body's own rules
    return [f"{path or '(body)'}: {message}"]


def _join(path: str, line: str) -> str:
    return f"{path}.{line}" if path else line


def convert(value: Any, kind: type[B]) -> B:
    """``value`` (decoded JSON) as a ``kind``, or :class:`InvalidBody`."""
    if not isinstance(value, dict):
        raise InvalidBody([f"(body): expected a JSON object, got {_json_type(value)}"])
    try:
        return msgspec.convert(value, kind, strict=True)
    except msgspec.ValidationError as exc:
        raise InvalidBody(_lines(exc)) from exc


# --- JSON Schema ---------------------------------------------------------------------------


def _ref_name(cls: type) -> str:
    return cls.__name__


def schema_components(kinds: Iterable[Any]) -> dict[str, Any]:
    """The JSON Schema of every type in ``kinds`` and what they hold, keyed by name, with
    each field's rules as keywords."""
    kinds = list(kinds)
    _, components = msgspec.json.schema_components(kinds, ref_template=REF_PREFIX + "{name}")
    seen: set[type] = set()

    def visit(cls: type) -> None:
        if cls in seen or not (isinstance(cls, type) and issubclass(cls, msgspec.Struct)):
            return
        seen.add(cls)
        schema = components.get(_ref_name(cls))
        if schema is None:
            return
        if cls.__doc__:
            schema["description"] = " ".join(cls.__doc__.split())
        for name, rules in _rules_of(cls).items():
            prop = schema["properties"][name]
            for rule in rules:
                prop.update(rule.schema())
        hints = typing.get_type_hints(cls)
        for hint in hints.values():
            for arg in (hint, *typing.get_args(hint)):
                visit(arg)

    for kind in kinds:
        visit(kind)
    return components
