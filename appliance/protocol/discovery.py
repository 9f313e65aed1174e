"""The discovery wire format, version 1 (UDP 57854): pure encode, decode, sign and verify.

A datagram is the 4 ASCII bytes ``CHUB``, one version byte ``0x01``, then one UTF-8 JSON
object; :data:`MAX_DATAGRAM` bytes at most. Two messages:

- :class:`Probe`, device -> broadcast or box: who the device is and its command port;
- :class:`Announce`, box -> broadcast (a beacon) or unicast reply to a probe: where the
  box is, its port map, the echoed nonce, and, once paired, an HMAC-SHA256 keyed by the
  store secret.

Unknown keys are ignored (forward compatibility); a missing, mistyped or out-of-bounds
key makes the datagram invalid. Duplicate keys, ``NaN`` and ``Infinity`` are refused: a
signed body must mean one thing to every JSON parser.

Signature: the box writes ``sig`` as the last key, in compact form, so a signed announce
ends with the 67 bytes ``"<64 lowercase hex>"}``. The signed message is the datagram with
those bytes replaced by ``null}`` -- exactly the datagram "with ``sig`` set to null"
(docs/discovery.md shows it in three lines of any language).

Errors (every one carries a short, bounded ``reason`` used as a metrics label)::

    DiscoveryError
    ├── DatagramTooLarge     over MAX_DATAGRAM bytes          reason "too_large"
    ├── BadMagic             not starting with b"CHUB"         reason "bad_magic"
    ├── UnsupportedVersion   a version byte other than 1       reason "bad_version"
    ├── BadJson              not UTF-8, not one JSON object    reason "bad_json"
    └── InvalidMessage       a key missing, mistyped, bounds   reason "bad_field"
        └── UnknownType      "type" is neither probe nor announce   reason "unknown_type"

:class:`BeaconSchedule` is the beacon's timer: due at start, on an address change, and
every ``interval_s`` with jitter.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import math
import random
import re
import unicodedata
from collections.abc import Hashable, Mapping
from typing import Any, Final

import attrs

__all__ = [
    "MAGIC",
    "MAX_DATAGRAM",
    "VERSION",
    "Announce",
    "BadJson",
    "BadMagic",
    "BeaconSchedule",
    "DatagramTooLarge",
    "DiscoveryError",
    "InvalidMessage",
    "Message",
    "Probe",
    "StoreIdentity",
    "UnknownType",
    "UnsupportedVersion",
    "clean_name",
    "decode",
    "encode",
    "sign",
    "valid_id",
    "verify",
]

MAGIC: Final = b"CHUB"
VERSION: Final = 1
_HEADER: Final = MAGIC + bytes([VERSION])
# 1200 bytes: fits in one IPv6 minimum-MTU packet (1280) with headers, so a datagram is
# never fragmented on any LAN; an announce with the full port map is about 400 bytes.
MAX_DATAGRAM: Final = 1200

# Field bounds (docs/discovery.md lists them for device developers).
MAX_NAME: Final = 100  # characters of a display name
MAX_NONCE: Final = 64
MAX_PORT_ROLES: Final = 32
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")  # device, box and store ids: URL-safe
_KIND = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
_ROLE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_NONCE = re.compile(rf"[\x21-\x7e]{{0,{MAX_NONCE}}}")  # visible ASCII
_FIRMWARE = re.compile(r"[\x21-\x7e]{1,32}")
_SIG = re.compile(r"[0-9a-f]{64}")
_SIG_TAIL = re.compile(rb'"sig":"([0-9a-f]{64})"}\Z')
_SIG_TAIL_LEN: Final = 67  # '"' + 64 hex + '"}'
# Characters a name must not hold: bidi controls can make a name display as another.
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


class DiscoveryError(Exception):
    """A datagram that is not a valid discovery message (version 1)."""

    reason = "invalid"


class DatagramTooLarge(DiscoveryError):
    reason = "too_large"


class BadMagic(DiscoveryError):
    reason = "bad_magic"


class UnsupportedVersion(DiscoveryError):
    reason = "bad_version"


class BadJson(DiscoveryError):
    reason = "bad_json"


class InvalidMessage(DiscoveryError):
    reason = "bad_field"


class UnknownType(InvalidMessage):
    reason = "unknown_type"


# --- field checks (attrs validators; also run on decode) -------------------------------


def _matches(pattern: re.Pattern[str], what: str) -> Any:
    def check(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, str) or pattern.fullmatch(value) is None:
            raise InvalidMessage(f"{attr.name}: must be {what}, got {_show(value)}")

    return check


def _optional(check: Any) -> Any:
    def optional(inst: object, attr: attrs.Attribute[Any], value: object) -> None:
        if value is not None:
            check(inst, attr, value)

    return optional


def _text(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str):
        raise InvalidMessage(f"{attr.name}: must be a string, got {_show(value)}")
    if len(value) > MAX_NAME:
        raise InvalidMessage(f"{attr.name}: at most {MAX_NAME} characters, got {len(value)}")
    for ch in value:
        if unicodedata.category(ch) in ("Cc", "Cs") or ch in _BIDI:
            raise InvalidMessage(f"{attr.name}: control character U+{ord(ch):04X} not allowed")


def _port(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if not _is_int(value) or not 0 <= value <= 65535:  # type: ignore[operator]
        raise InvalidMessage(f"{attr.name}: must be an integer port 0-65535, got {_show(value)}")


def _address(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    try:
        if not isinstance(value, str) or len(value) > 64:
            raise ValueError(value)
        ipaddress.ip_address(value)
    except ValueError:
        raise InvalidMessage(f"{attr.name}: must be an IP address, got {_show(value)}") from None


def _ports(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, Mapping) or not 1 <= len(value) <= MAX_PORT_ROLES:
        raise InvalidMessage(f"{attr.name}: must be an object of 1-{MAX_PORT_ROLES} role: port pairs")
    for role, port in value.items():
        if not isinstance(role, str) or _ROLE.fullmatch(role) is None:
            raise InvalidMessage(f"{attr.name}: bad role name {_show(role)}")
        if not _is_int(port) or not 0 <= port <= 65535:
            raise InvalidMessage(f"{attr.name}.{role}: must be an integer port 0-65535, got {_show(port)}")


def _timestamp(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, float) or not math.isfinite(value):
        raise InvalidMessage(f"{attr.name}: must be a finite number, got {_show(value)}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _as_ports(value: Mapping[str, int]) -> dict[str, int]:
    return dict(value) if isinstance(value, Mapping) else value


def _as_float(value: object) -> object:
    # JSON has one number type: 1700000000 is a fine timestamp. An int too large for a
    # float is left as it is, for the validator to refuse.
    if _is_int(value):
        try:
            return float(value)  # type: ignore[arg-type]
        except OverflowError:
            return value
    return value


# --- the two messages --------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Probe:
    """A device looking for the box. ``port`` is its command port (normally 8081); 0 means
    it has none (a tool such as ``appliance discover``: answered, never registered)."""

    device_id: str = attrs.field(validator=_matches(_ID, "1-64 of A-Z a-z 0-9 . _ : - (starting alphanumeric)"))
    kind: str = attrs.field(validator=_matches(_KIND, "1-32 of A-Z a-z 0-9 . _ - (starting alphanumeric)"))
    name: str = attrs.field(validator=_text)
    port: int = attrs.field(validator=_port)
    nonce: str = attrs.field(validator=_matches(_NONCE, f"0-{MAX_NONCE} visible ASCII characters"))
    # A signed probe (the device's key; see :func:`sign`) carries its time and its HMAC; only
    # a signed probe may move an adopted device to another address or port.
    ts: float | None = attrs.field(default=None, converter=_as_float, validator=_optional(_timestamp))
    sig: str | None = attrs.field(default=None, validator=_optional(_matches(_SIG, "64 lowercase hex or null")))


@attrs.frozen(kw_only=True)
class Announce:
    """The box: where it is (``address``, on the interface the probe came in on), its port
    map, the probe's nonce (None in a beacon), and ``sig`` once paired (None before)."""

    appliance_id: str = attrs.field(validator=_matches(_ID, "an id"))
    store_id: str | None = attrs.field(validator=_optional(_matches(_ID, "an id or null")))
    name: str = attrs.field(validator=_text)
    firmware: str = attrs.field(validator=_matches(_FIRMWARE, "1-32 visible ASCII characters"))
    address: str = attrs.field(validator=_address)
    ports: Mapping[str, int] = attrs.field(converter=_as_ports, validator=_ports)
    nonce: str | None = attrs.field(validator=_optional(_matches(_NONCE, "a nonce or null")))
    ts: float = attrs.field(converter=_as_float, validator=_timestamp)
    sig: str | None = attrs.field(default=None, validator=_optional(_matches(_SIG, "64 lowercase hex or null")))


Message = Probe | Announce


@attrs.frozen(kw_only=True)
class StoreIdentity:
    """What pairing gives discovery: the store id, and the secret that keys the HMAC
    (empty: the platform gave none, announces are unsigned)."""

    store_id: str
    secret: bytes = attrs.field(repr=False)


def valid_id(text: str) -> bool:
    """Whether ``text`` can be a device, box or store id on the wire."""
    return _ID.fullmatch(text) is not None


def clean_name(text: str) -> str:
    """``text`` made into a valid display name: control characters dropped, cut to size."""
    kept = "".join(ch for ch in text if unicodedata.category(ch) not in ("Cc", "Cs") and ch not in _BIDI)
    return kept[:MAX_NAME]


# --- encoding ------------------------------------------------------------------------------


def _fields(message: Message) -> dict[str, Any]:
    if isinstance(message, Probe):
        fields = {"type": "probe", "device_id": message.device_id, "kind": message.kind, "name": message.name,
                  "port": message.port, "nonce": message.nonce}
        if message.ts is not None or message.sig is not None:  # a signed probe: sig last, as in an announce
            fields.update(ts=message.ts, sig=message.sig)
        return fields
    # sig last: a signed datagram then ends with it (see the module docstring).
    return {"type": "announce", "appliance_id": message.appliance_id, "store_id": message.store_id,
            "name": message.name, "firmware": message.firmware, "address": message.address,
            "ports": dict(message.ports), "nonce": message.nonce, "ts": message.ts, "sig": message.sig}


def encode(message: Message) -> bytes:
    """The datagram for ``message`` (``sig`` written as it is). Raises DatagramTooLarge."""
    body = json.dumps(_fields(message), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    datagram = _HEADER + body.encode("utf-8")
    if len(datagram) > MAX_DATAGRAM:
        raise DatagramTooLarge(f"datagram would be {len(datagram)} bytes; the limit is {MAX_DATAGRAM}")
    return datagram


def _mac(key: bytes, unsigned: bytes) -> str:
    return hmac.new(key, unsigned, hashlib.sha256).hexdigest()


def sign(message: Message, key: bytes) -> bytes:
    """The datagram for ``message`` with ``sig`` = HMAC-SHA256(key, datagram with sig null).

    An announce is signed with the store secret; a probe with the device's key, and it
    must carry ``ts`` (the device's clock, so the box can refuse an old one replayed)."""
    if isinstance(message, Probe) and message.ts is None:
        raise InvalidMessage("a signed probe needs ts")
    unsigned = encode(attrs.evolve(message, sig=None))
    signed = unsigned[: -len(b"null}")] + b'"' + _mac(key, unsigned).encode("ascii") + b'"}'
    if len(signed) > MAX_DATAGRAM:
        raise DatagramTooLarge(f"signed datagram would be {len(signed)} bytes; the limit is {MAX_DATAGRAM}")
    return signed


def verify(datagram: bytes, key: bytes) -> bool:
    """True only for a valid announce (or signed probe) whose ``sig`` is the HMAC of its
    body under ``key``."""
    try:
        message = decode(datagram)
    except DiscoveryError:
        return False
    tail = _SIG_TAIL.search(datagram)
    if message.sig is None or tail is None:
        return False
    if tail[1].decode("ascii") != message.sig:
        return False  # the tail is not the top-level sig
    unsigned = datagram[:-_SIG_TAIL_LEN] + b"null}"
    return hmac.compare_digest(_mac(key, unsigned), message.sig)


# --- decoding ------------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BadJson(f"key {_show(key)} appears twice")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise BadJson(f"{name} is not a JSON number")


_REQUIRED: Final[dict[str, tuple[str, ...]]] = {
    "probe": ("device_id", "kind", "name", "port", "nonce"),
    "announce": ("appliance_id", "store_id", "name", "firmware", "address", "ports", "nonce", "ts", "sig"),
}


_PROBE_SIGNED: Final = ("ts", "sig")


def decode(datagram: bytes) -> Message:
    """The message in ``datagram``, or :class:`DiscoveryError` (and nothing else)."""
    if len(datagram) > MAX_DATAGRAM:
        raise DatagramTooLarge(f"{len(datagram)} bytes; the limit is {MAX_DATAGRAM}")
    if datagram[:4] != MAGIC:
        raise BadMagic("not a discovery datagram (no CHUB magic)")
    if len(datagram) < 5 or datagram[4] != VERSION:
        got = datagram[4] if len(datagram) > 4 else "none"
        raise UnsupportedVersion(f"version {got}; this box speaks version {VERSION}")
    try:
        text = datagram[5:].decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise BadJson(f"not UTF-8: {exc.reason} at byte {exc.start + 5}") from None
    except RecursionError:
        raise BadJson("JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and int conversion limits
        raise BadJson(f"not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadJson(f"the body must be a JSON object, got {type(obj).__name__}")
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in _REQUIRED:
        raise UnknownType(f"type: must be probe or announce, got {_show(kind)}")
    missing = [key for key in _REQUIRED[kind] if key not in obj]
    if missing:
        raise InvalidMessage(f"{kind}: missing key(s) {', '.join(missing)}")
    fields = {key: obj[key] for key in _REQUIRED[kind]}
    if kind == "probe":
        fields.update({key: obj[key] for key in _PROBE_SIGNED if key in obj})
    try:
        return Probe(**fields) if kind == "probe" else Announce(**fields)
    except (TypeError, ValueError) as exc:  # a converter on a mistyped value
        raise InvalidMessage(f"{kind}: {exc}") from None


# --- the beacon's timer ----------------------------------------------------------------------


class BeaconSchedule:
    """When to send the next beacon: at start, as soon as the box's addresses change, then
    every ``interval_s`` spread by +/- ``jitter`` (so boxes and devices do not fall in step).
    """

    def __init__(self, interval_s: float, *, jitter: float = 0.1, rng: random.Random | None = None) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.interval_s = interval_s
        self.jitter = jitter
        self._rng = rng or random.Random()
        self._due = -math.inf
        self._addresses: Hashable = None

    @property
    def next_due(self) -> float:
        return self._due

    def addresses_seen(self, addresses: Hashable, now: float) -> bool:
        """Report the current addresses; a change makes a beacon due now. True if changed."""
        if addresses == self._addresses:
            return False
        self._addresses = addresses
        self._due = min(self._due, now)
        return True

    def due(self, now: float) -> bool:
        return now >= self._due

    def sent(self, now: float) -> None:
        spread = 1 + self.jitter * (2 * self._rng.random() - 1)
        self._due = now + self.interval_s * spread
