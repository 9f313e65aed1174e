"""What devices post to the store API (``POST /v1/sales``, ``POST /v1/orders``), sans-I/O.

Bodies are structured by cattrs into frozen attrs records with strict scalar hooks (no
``"2"`` for 2, no ``true`` for 1, no lone surrogates in strings), unknown fields refused,
and every problem reported with its path (``lines[0].qty: must not be 0``). The rules are
at least as strict as the platform's event rules (docs/cloud-contract.md), so a sale the
box accepts is a sale the platform accepts: errors reach the device that can fix them,
not a rejection hours later.

Exceptions: :class:`InvalidRecord` (``errors``: one path-named line per problem).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from typing import Any, Final, TypeVar

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError

from appliance.protocol.errors import FieldError, NestedErrors, flatten
from appliance.protocol.events import EVENT_TYPE_OF, RecordKind, event, order_received, record_event_id

__all__ = [
    "CLIENT_ID_MAX",
    "LINES_MAX",
    "RECORD_MAX_BYTES",
    "InvalidRecord",
    "Order",
    "OrderLine",
    "Payment",
    "Sale",
    "SaleLine",
    "canonical",
    "canonical_json",
    "event_id_of",
    "event_of",
    "parse_order",
    "parse_sale",
]

T = TypeVar("T")

# Ids: the platform's event-id alphabet; the box prefixes "sale-"/"order-", so the
# device's own id leaves room for it within the platform's 128 characters.
CLIENT_ID_MAX: Final = 120
_ID: Final = re.compile(r"[A-Za-z0-9._:-]+")
TEXT_MAX: Final = 128  # the platform's bound on a string field
NOTE_MAX: Final = 1000
LINES_MAX: Final = 500  # the platform's bound on sale lines
# The largest sale or order body taken: 500 lines of a few fields of at most 128 characters
# fit in far less; anything bigger is refused (413) before it is read.
RECORD_MAX_BYTES: Final = 512 * 1024
# Beyond these, a number is a bug on the device (a price in cents above 10 million euros).
QTY_MAX: Final = 1_000_000
CENTS_MAX: Final = 10**12
_CURRENCY: Final = re.compile(r"[A-Z]{3}")
_RFC3339: Final = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?([Zz]|[+-](\d{2}):(\d{2}))")


class InvalidRecord(ValueError):
    """A posted body is not a valid record; ``errors`` has one path-named line per problem."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(self.errors))


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


def _text(max_chars: int, *, empty: bool = False, multiline: bool = False) -> Any:
    def check(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
        if not value and not empty:
            raise FieldError(attr.name, "must not be empty")
        if len(value) > max_chars:
            raise FieldError(attr.name, f"at most {max_chars} characters, got {len(value)}")
        bad = _bad_character(value, multiline=multiline)
        if bad is not None:
            raise FieldError(attr.name, f"printable characters only (docs/hardening.md); {bad}")

    return check


def _client_id(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    if not 1 <= len(value) <= CLIENT_ID_MAX or not _ID.fullmatch(value):
        raise FieldError(attr.name, f"1 to {CLIENT_ID_MAX} characters of A-Z a-z 0-9 . _ : - (got {value!r:.40})")


def _between(lo: int, hi: int, *, nonzero: bool = False) -> Any:
    def check(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
        if not lo <= value <= hi:
            raise FieldError(attr.name, f"must be between {lo} and {hi}, got {value}")
        if nonzero and value == 0:
            raise FieldError(attr.name, "must not be 0")

    return check


def _currency(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    if not _CURRENCY.fullmatch(value):
        raise FieldError(attr.name, f"must be 3 capital letters (ISO 4217, e.g. EUR), got {value!r:.20}")


def _timestamp(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    if not value:
        return  # absent: the box stamps the time it received the record
    m = _RFC3339.fullmatch(value)
    ok = m is not None and 1 <= int(m[2]) <= 12 and 1 <= int(m[3]) <= 31 and int(m[4]) < 24 and int(m[5]) < 60 \
        and int(m[6]) <= 60 and (m[9] is None or (int(m[9]) < 24 and int(m[10]) < 60))
    if not ok:
        raise FieldError(attr.name, f"must be an RFC 3339 time with an offset (2025-03-01T09:30:00Z), "
                                     f"got {value!r:.40}")


def _count(lo: int, hi: int) -> Any:
    def check(_inst: object, attr: attrs.Attribute[tuple[Any, ...]], value: tuple[Any, ...]) -> None:
        if not lo <= len(value) <= hi:
            raise FieldError(attr.name, f"must hold {lo} to {hi} items, got {len(value)}")

    return check


def _check_total(total_cents: int, lines: Sequence[SaleLine | OrderLine]) -> None:
    """The total is the sum of the lines (qty x unit price): a till that sends another
    figure has a bug, and the platform would book the wrong amount."""
    expected = sum(line.qty * line.unit_price_cents for line in lines)
    if total_cents != expected:
        raise FieldError("total_cents", f"must be the sum of the lines (qty x unit_price_cents), {expected}; "
                                        f"got {total_cents}")


@attrs.frozen(kw_only=True)
class SaleLine:
    sku: str = attrs.field(validator=_text(TEXT_MAX))
    qty: int = attrs.field(validator=_between(-QTY_MAX, QTY_MAX, nonzero=True))  # negative: a return
    unit_price_cents: int = attrs.field(validator=_between(0, CENTS_MAX))


@attrs.frozen(kw_only=True)
class Payment:
    method: str = attrs.field(validator=_text(TEXT_MAX))
    amount_cents: int = attrs.field(validator=_between(-CENTS_MAX, CENTS_MAX))


@attrs.frozen(kw_only=True)
class Sale:
    id: str = attrs.field(validator=_client_id)
    device_id: str = attrs.field(validator=_text(TEXT_MAX))
    currency: str = attrs.field(validator=_currency)
    total_cents: int = attrs.field(validator=_between(-CENTS_MAX, CENTS_MAX))
    lines: tuple[SaleLine, ...] = attrs.field(validator=_count(1, LINES_MAX))
    payments: tuple[Payment, ...] = attrs.field(default=(), validator=_count(0, LINES_MAX))
    at: str = attrs.field(default="", validator=_timestamp)

    def __attrs_post_init__(self) -> None:
        _check_total(self.total_cents, self.lines)


@attrs.frozen(kw_only=True)
class OrderLine:
    sku: str = attrs.field(validator=_text(TEXT_MAX))
    qty: int = attrs.field(validator=_between(1, QTY_MAX))
    unit_price_cents: int = attrs.field(validator=_between(0, CENTS_MAX))
    name: str = attrs.field(default="", validator=_text(TEXT_MAX, empty=True))


@attrs.frozen(kw_only=True)
class Order:
    """An order taken on a device (a kiosk, a POS): goes up as ``order.status`` "received"."""

    id: str = attrs.field(validator=_client_id)
    device_id: str = attrs.field(validator=_text(TEXT_MAX))
    currency: str = attrs.field(validator=_currency)
    total_cents: int = attrs.field(validator=_between(0, CENTS_MAX))
    lines: tuple[OrderLine, ...] = attrs.field(validator=_count(1, LINES_MAX))
    note: str = attrs.field(default="", validator=_text(NOTE_MAX, empty=True, multiline=True))
    at: str = attrs.field(default="", validator=_timestamp)

    def __attrs_post_init__(self) -> None:
        _check_total(self.total_cents, self.lines)


# --- the converter ---------------------------------------------------------------------------


def _strict(kind: type[T]) -> Any:
    def structure(value: object, _type: object) -> T:
        if isinstance(value, bool) or not isinstance(value, kind):
            raise TypeError(f"expected {'integer' if kind is int else 'string'}, got {_json_type(value)}")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise TypeError("not valid Unicode text (a lone surrogate)") from None
        return value

    return structure


def _json_type(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _tuple_of(item: type[T], converter: cattrs.Converter) -> Any:
    def structure(value: object, _type: object) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise TypeError(f"expected a list, got {_json_type(value)}")
        if len(value) > LINES_MAX:
            raise TypeError(f"at most {LINES_MAX} items, got {len(value)}")
        out: list[T] = []
        errors: list[str] = []
        for i, element in enumerate(value):
            if not isinstance(element, dict):
                errors.append(f"[{i}]: expected an object, got {_json_type(element)}")
                continue
            try:
                out.append(converter.structure(element, item))
            except (ClassValidationError, ForbiddenExtraKeysError, TypeError, ValueError) as exc:
                errors.extend(f"[{i}]{line.removeprefix('(body)')}" if line.startswith("(body)") else f"[{i}].{line}"
                              for line in flatten(exc, noun="field", top="(body)"))
        if errors:
            raise NestedErrors(errors)
        return tuple(out)

    return structure


def _is_tuple_of(item: type) -> Any:
    target = tuple[item, ...]  # type: ignore[valid-type]

    def matches(t: Any) -> bool:
        return bool(t == target)

    return matches


def _converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(int, _strict(int))
    conv.register_structure_hook(str, _strict(str))
    for item in (SaleLine, Payment, OrderLine):
        conv.register_structure_hook_func(_is_tuple_of(item), _tuple_of(item, conv))
    return conv


_CONVERTER: Final = _converter()


def _parse(value: Any, kind: type[T]) -> T:
    if not isinstance(value, dict):
        raise InvalidRecord([f"(body): expected a JSON object, got {_json_type(value)}"])
    try:
        return _CONVERTER.structure(value, kind)
    except (ClassValidationError, ForbiddenExtraKeysError, TypeError, ValueError) as exc:
        raise InvalidRecord(flatten(exc, noun="field", top="(body)")) from exc


def parse_sale(value: Any) -> Sale:
    """A sale from its decoded JSON, or :class:`InvalidRecord`."""
    return _parse(value, Sale)


def parse_order(value: Any) -> Order:
    """An order from its decoded JSON, or :class:`InvalidRecord`."""
    return _parse(value, Order)


def canonical(record: Sale | Order) -> dict[str, Any]:
    """The record as plain data (what is stored and compared for idempotency); optional
    fields left empty are left out, so sending them empty or not at all is the same."""
    data: dict[str, Any] = _CONVERTER.unstructure(record)
    for optional in ("at", "payments", "note"):
        if optional in data and not data[optional]:
            del data[optional]
    return data


def event_id_of(kind: str, record_id: str) -> str:
    """The platform event id of a device's sale or order (``sale-<id>``, ``order-<id>``)."""
    return record_event_id(kind, record_id)


def event_of(record: Sale | Order, *, received_at: str) -> dict[str, Any]:
    """The platform event for a device's record (docs/cloud-contract.md, "Events up")."""
    at = record.at or received_at
    body = canonical(record)
    del body["id"]
    body.pop("at", None)
    if isinstance(record, Sale):
        return event(id=event_id_of(RecordKind.SALE, record.id), type=EVENT_TYPE_OF[RecordKind.SALE], at=at, data=body)
    # The contract has no event for an order taken on a device: it goes up as its first
    # status, "received", carrying the order itself (the platform keeps unknown fields).
    return order_received(id=event_id_of(RecordKind.ORDER, record.id), order_id=record.id, at=at, **body)


def canonical_json(value: Any) -> str:
    """Compact JSON with sorted keys: equal records give equal text (the idempotency test).
    Validated records hold no lone surrogates, so the text is always valid UTF-8."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
