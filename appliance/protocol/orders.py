"""Online orders from Service Bus, sans I/O: the message body, routing, the derived ids.

- :func:`parse_order` turns a message body (bytes) into an :class:`OnlineOrder`, or raises
  :class:`OrderError` with a reason for a person (the receiver dead-letters with it).
- :func:`parse_routing` reads ``store_config.routing`` (device kind -> command kinds);
  :func:`choose_routing` picks the store's, else the config's, else :data:`DEFAULT_ROUTING`.
- :func:`targets` lists the devices an order goes to; :func:`command_id` makes the
  device command's id from the message id and the device, so a redelivered message
  enqueues nothing new (the outbox is idempotent on the id).

The body (docs/orders.md)::

    {"order_id": "web-000001", "channel": "click_and_collect", "created_at": "...",
     "customer": {"name": "..."}, "currency": "EUR", "total_cents": 1047,
     "lines": [{"sku": "SKU-000007", "name": "...", "qty": 3, "unit_price_cents": 349}],
     "pickup_at": "...", "event": "created"}

Required: ``order_id``, ``currency``, ``total_cents``, ``lines`` (1..500). ``event`` is
``created`` (default) or ``updated``; other fields are kept as they came (the platform
may add some), within :data:`MAX_ORDER_BYTES`.

Exceptions::

    OrderError     the body is not an order (the reason says what is wrong)
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import attrs

from appliance.protocol.channel_codec import ChannelProtocolError, check_kind
from appliance.protocol.events import online_order_event_id

__all__ = [
    "DEFAULT_ROUTING",
    "MAX_ORDER_BYTES",
    "OnlineOrder",
    "OrderError",
    "Routing",
    "canonical_json",
    "choose_routing",
    "command_id",
    "event_id",
    "parse_order",
    "parse_routing",
    "targets",
]

# The whole order travels in each device command, whose body is at most 60 KiB
# (appliance.protocol.channel_codec.MAX_BODY_BYTES); an order of 500 lines is ~40 KiB.
MAX_ORDER_BYTES: Final = 48 * 1024
MAX_LINES: Final = 500
# order_id goes into the platform event id "online:<order_id>:received" (<= 128 chars).
MAX_ORDER_ID_CHARS: Final = 100
MAX_TEXT_CHARS: Final = 256
_ID: Final = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_ORDER_ID_CHARS}}}")
_CURRENCY: Final = re.compile(r"[A-Z]{3}")
_EVENTS: Final = {"created": "order.created", "updated": "order.updated"}

# Device kinds as the platform names them -> as devices name themselves on the LAN.
_KIND_ALIASES: Final = {"kitchen_screen": "kds"}

Routing = Mapping[str, frozenset[str]]

# Without a routing from the store or the config: kitchen screens show new and changed
# orders, printers print new ones. POS and kiosks get nothing (the order is for the
# kitchen and the pickup counter; a POS reads orders from the store API).
DEFAULT_ROUTING: Final[Routing] = {
    "kds": frozenset({"order.created", "order.updated"}),
    "printer": frozenset({"order.created"}),
}


class OrderError(ValueError):
    """The message is not an order this box can take; the text is the reason."""


@attrs.frozen(kw_only=True)
class OnlineOrder:
    order_id: str
    kind: str  # the device command kind: order.created or order.updated
    currency: str
    total_cents: int
    line_count: int
    data: Mapping[str, Any] = attrs.field(eq=False)  # the whole body as received

    def as_dict(self) -> dict[str, Any]:
        return dict(self.data)


def canonical_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(obj: Mapping[str, Any], key: str, where: str, *, minimum: int | None = None) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise OrderError(f"{where}{key}: must be an integer, got {_show(value)}")
    if minimum is not None and value < minimum:
        raise OrderError(f"{where}{key}: must be at least {minimum}, got {value}")
    return value


def _text(obj: Mapping[str, Any], key: str, where: str, *, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT_CHARS:
        raise OrderError(f"{where}{key}: must be a non-empty string of at most {MAX_TEXT_CHARS} characters, "
                         f"got {_show(value)}")
    return value


def _line(item: object, index: int) -> None:
    where = f"lines[{index}]."
    if not isinstance(item, dict):
        raise OrderError(f"lines[{index}]: must be an object, got {_show(item)}")
    _text(item, "sku", where)
    _text(item, "name", where, required=False)
    _int(item, "qty", where, minimum=1)
    _int(item, "unit_price_cents", where, minimum=0)


def _no_float_trouble(value: object) -> None:
    # json.loads accepts NaN and Infinity; they are not JSON and cannot be sent on.
    if isinstance(value, float) and not math.isfinite(value):
        raise OrderError("the body holds NaN or Infinity, which JSON does not allow")
    if isinstance(value, dict):
        for v in value.values():
            _no_float_trouble(v)
    elif isinstance(value, list):
        for v in value:
            _no_float_trouble(v)


def parse_order(body: bytes) -> OnlineOrder:
    """The order in a message body, or :class:`OrderError` saying why not."""
    if len(body) > MAX_ORDER_BYTES:
        raise OrderError(f"the body is {len(body)} bytes; an order is at most {MAX_ORDER_BYTES}")
    if not body:
        raise OrderError("the body is empty")
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise OrderError(f"the body is not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    except (ValueError, RecursionError) as exc:
        raise OrderError(f"the body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise OrderError(f"the body must be a JSON object, got {type(data).__name__}")
    _no_float_trouble(data)
    order_id = data.get("order_id")
    if not isinstance(order_id, str) or not _ID.fullmatch(order_id):
        raise OrderError(f"order_id: must be 1 to {MAX_ORDER_ID_CHARS} of A-Z a-z 0-9 . _ : -, got {_show(order_id)}")
    currency = data.get("currency")
    if not isinstance(currency, str) or not _CURRENCY.fullmatch(currency):
        raise OrderError(f"currency: must be 3 capital letters (ISO 4217), got {_show(currency)}")
    total = _int(data, "total_cents", "", minimum=0)
    lines = data.get("lines")
    if not isinstance(lines, list) or not 1 <= len(lines) <= MAX_LINES:
        raise OrderError(f"lines: must be a list of 1 to {MAX_LINES} lines, got {_show(lines)}")
    for i, item in enumerate(lines):
        _line(item, i)
    event = data.get("event", "created")
    if not isinstance(event, str) or event not in _EVENTS:
        raise OrderError(f"event: must be one of {', '.join(_EVENTS)}, got {_show(event)}")
    for key in ("channel", "created_at", "pickup_at"):
        _text(data, key, "", required=False)
    customer = data.get("customer")
    if customer is not None and not isinstance(customer, dict):
        raise OrderError(f"customer: must be an object, got {_show(customer)}")
    return OnlineOrder(order_id=order_id, kind=_EVENTS[event], currency=currency, total_cents=total,
                       line_count=len(lines), data=data)


# --- routing ----------------------------------------------------------------------------


def _device_kind(kind: str) -> str:
    return _KIND_ALIASES.get(kind, kind)


def _is_kind(value: object) -> bool:
    try:
        check_kind(value)
    except ChannelProtocolError:
        return False
    return True


def parse_routing(value: object) -> Routing:
    """``store_config.routing`` (or ``[orders] routing``) as a :data:`Routing`.

    Raises :class:`OrderError` when it is not an object of lists of command kinds."""
    if not isinstance(value, Mapping):
        raise OrderError(f"routing: must be an object of device kind -> command kinds, got {_show(value)}")
    out: dict[str, set[str]] = {}
    for kind, commands in value.items():
        if not isinstance(kind, str) or not kind:
            raise OrderError(f"routing: a device kind must be a non-empty string, got {_show(kind)}")
        if not isinstance(commands, list | tuple) or not all(_is_kind(c) for c in commands):
            raise OrderError(f"routing.{kind}: must be a list of command kinds, got {_show(commands)}")
        out.setdefault(_device_kind(kind), set()).update(commands)
    return {k: frozenset(v) for k, v in out.items()}


def choose_routing(store: object | None, configured: Mapping[str, Sequence[str]]) -> tuple[Routing, str]:
    """The routing to use and where it came from (``store``, ``config`` or ``default``).

    ``store`` is ``store_config.routing`` from the replica (None if absent); a malformed
    one is skipped (the config's or the default applies) rather than stopping orders."""
    if store is not None:
        try:
            return parse_routing(store), "store"
        except OrderError:
            pass
    if configured:
        return parse_routing(dict(configured)), "config"
    return DEFAULT_ROUTING, "default"


def targets(kind: str, devices: Iterable[tuple[str, str]], routing: Routing) -> list[str]:
    """The ids of the devices (``(id, kind)`` pairs) that receive a command of ``kind``."""
    return sorted({device_id for device_id, device_kind in devices
                   if kind in routing.get(_device_kind(device_kind), frozenset())})


BUS_FIELDS: Final = ("namespace", "queue", "sas_key_name", "sas_key")


def bus_settings(configured: Mapping[str, str], default_namespace: str, paired: Mapping[str, Any]) -> dict[str, str]:
    """A Service Bus queue's effective settings: pairing gives the values, and a config value
    that differs from the embedded default wins (a namespace left at its default is the
    pairing's, any other field left empty is the pairing's)."""
    values: dict[str, str] = {}
    for field in BUS_FIELDS:
        mine = configured.get(field, "")
        default = default_namespace if field == "namespace" else ""
        theirs = paired.get(field)
        if mine and mine != default:
            values[field] = mine
        elif isinstance(theirs, str) and theirs:
            values[field] = theirs
        else:
            values[field] = mine
    return values


def command_id(message_id: str, device_id: str, *, source: str = "sb") -> str:
    """The device command's id for this message (or order) and device (fits the outbox's 64
    chars). ``source`` says where the order came from: ``sb`` Service Bus, ``dev`` a device."""
    digest = hashlib.blake2b(f"{message_id}\x00{device_id}".encode(), digest_size=16).hexdigest()
    return f"{source}-{digest}"


def event_id(order_id: str) -> str:
    """The platform event saying the shop received the order (docs/cloud-contract.md)."""
    return online_order_event_id(order_id)
