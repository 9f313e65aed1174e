"""Words for a person that can be said again in the reader's language.

A :class:`Text` is an English ``str`` (so logs, JSON, the heartbeat and every existing
reader keep working unchanged) that also remembers its template, a message of the
gettext catalogs (``appliance/locale``), and the values put into it. Whoever shows it to
a person renders it in their language with :func:`say`; a value that is itself a Text is
translated too. Templates use ``str.format`` fields: ``Text("disk almost full: {free}",
free=words)``. Babel extracts them by this class's name (``tests/test_i18n.py``).

Plain ``str`` values stay as they are in every language: a path, an address, an
exception's own words. A :class:`Number` is said with the reader's digits ("1,234.5" in
English, "1 234,5" in French: Babel's CLDR data), so a count never reads as a decimal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from babel.numbers import format_decimal

__all__ = ["Number", "Text", "join", "say"]


class Text(str):
    """``template`` formatted with ``args``, in English; :meth:`in_language` for another."""

    template: str
    args: Mapping[str, Any]

    def __new__(cls, template: str, /, **args: Any) -> Text:
        self = super().__new__(cls, template.format(**args) if args else template)
        self.template = template
        self.args = args
        return self

    def in_language(self, gettext: Callable[[str], str]) -> str:
        if not self.template:
            return ""  # gettext("") is a catalog's header, not a translation
        values = {k: say(v, gettext) for k, v in self.args.items()}
        return gettext(self.template).format(**values) if values else gettext(self.template)

    def __reduce__(self) -> tuple[Any, ...]:  # pickling keeps the template
        return (_rebuild, (self.template, dict(self.args)))


def _rebuild(template: str, args: dict[str, Any]) -> Text:
    return Text(template, **args)


class Number(str):
    """A count or a measure, in English ("1,234", "1.5"); :meth:`in_language` with the
    language's digits and separators. ``decimals``: at most this many after the point."""

    value: float
    decimals: int

    def __new__(cls, value: float, /, decimals: int = 0) -> Number:
        self = super().__new__(cls, _digits(value, decimals, "en"))
        self.value, self.decimals = value, decimals
        return self

    def in_language(self, language: str) -> str:
        return _digits(self.value, self.decimals, language)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Number, (self.value, self.decimals))


def _digits(value: float, decimals: int, language: str) -> str:
    pattern = "#,##0" + ("." + "#" * decimals if decimals else "")
    return str(format_decimal(round(value, decimals), format=pattern, locale=language))


def language_of(gettext: Callable[[str], str]) -> str:
    """The language a gettext speaks (``appliance.services.i18n.gettext_for`` marks it);
    English for any other callable (a test's identity, say)."""
    language = getattr(gettext, "language", "en")
    return language if isinstance(language, str) else "en"


def say(value: Any, gettext: Callable[[str], str]) -> Any:
    """``value`` in the language of ``gettext`` if it is a :class:`Text` (or the like:
    the WAN preflight has its own, being one file of the standard library) or a
    :class:`Number`; else unchanged."""
    if isinstance(value, Text):
        return value.in_language(gettext)
    if isinstance(value, Number):
        return value.in_language(language_of(gettext))
    template, args = getattr(value, "template", None), getattr(value, "args", None)
    if isinstance(value, str) and isinstance(template, str) and isinstance(args, dict):
        return Text(template, **args).in_language(gettext)
    return value


# A list's separators in the reader's typography (French puts a space before ";").
_SEPARATORS = {"; ": Text("; ")}


def join(separator: str, parts: Iterable[str]) -> Text:
    """``separator.join(parts)`` that stays translatable part by part (and its separator:
    "; " is " ; " in French)."""
    items = list(parts)
    values: dict[str, Any] = {f"p{i}": p for i, p in enumerate(items)}
    sep = _SEPARATORS.get(separator)
    if sep is not None and len(items) > 1:
        values["sep"], separator = sep, "{sep}"
    template = separator.join(f"{{p{i}}}" for i in range(len(items)))
    return Text(template, **values)
