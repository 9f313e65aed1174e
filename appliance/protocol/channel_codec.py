"""The device channel's wire format (``chub.device.v1``): JSON text messages, both ways.

Box to device::

    {"t": "cmd", "id": str, "seq": int, "kind": str, "expires_at": float | null, "body": {...}}

Device to box::

    {"t": "hello", "device_id": str, "kind": str, "firmware": str, "nonce": hex32}   (first message)
    {"t": "auth", "proof": hex64}                     (second, answering the box's auth)
    {"t": "ack", "id": str}
    {"t": "nack", "id": str, "reason": str, "retry": bool}
    {"t": "ticket"}                                   (the device's own button asks for the status ticket)

The hello (docs/device-api.md): a device with a key sends a fresh ``nonce`` in its hello;
the box answers ``{"t": "auth", "nonce": hex32, "proof": hex64}`` (it holds the key), the
device checks it and answers its own ``auth`` (it holds the key too); only then does the
box send commands. A device without a key (adopted before enrollment) sends no nonce.

Parsing is strict about what v1 defines (types, sizes, the set of message types: a newer
protocol is a new subprotocol name) and ignores keys it does not know, so a device can
carry extra diagnostic fields. Sizes are checked before JSON is decoded.

Exceptions::

    ChannelError                  (appliance.protocol.channel_codec)
     ├── ChannelProtocolError     the peer sent something v1 does not allow
     ├── HelloRefused             the peer did not prove it holds the device key
     └── LinkStalled              the peer stopped answering in time (raised by the window)
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Mapping
from typing import Any, Final

import attrs

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_COMMAND_BYTES",
    "MAX_DEVICE_MESSAGE_BYTES",
    "SUBPROTOCOL",
    "Ack",
    "AskTicket",
    "Auth",
    "ChannelError",
    "ChannelProtocolError",
    "Command",
    "DeviceMessage",
    "Hello",
    "HelloRefused",
    "LinkStalled",
    "MessageType",
    "Nack",
    "check_command_id",
    "check_kind",
    "encode_body",
    "encode_box_auth",
    "encode_command",
    "encode_device_message",
    "parse_box_auth",
    "parse_command",
    "parse_device_message",
]

SUBPROTOCOL: Final = "chub.device.v1"

# hello, ack and nack are a few hundred bytes at most; anything far bigger is garbage,
# refused before it is decoded.
MAX_DEVICE_MESSAGE_BYTES: Final = 4096
# A command's body: an order with its lines or a receipt to print fits in a few KiB;
# images and documents go by media URL (port 8002), never inline.
MAX_BODY_BYTES: Final = 60 * 1024
# A whole encoded command: the body plus the envelope.
MAX_COMMAND_BYTES: Final = MAX_BODY_BYTES + 1024
MAX_ID_CHARS: Final = 64
MAX_KIND_CHARS: Final = 64
MAX_DEVICE_ID_CHARS: Final = 128
MAX_FIRMWARE_CHARS: Final = 64
MAX_REASON_CHARS: Final = 500

# Command ids travel in URLs and logs: letters, digits and ._:- only.
_ID: Final = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_ID_CHARS}}}")
# Kinds are dotted lower-case names: order.created, print, display, config, ping.
_KIND: Final = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)*")
_NONCE: Final = re.compile(r"[0-9a-f]{32}")
_PROOF: Final = re.compile(r"[0-9a-f]{64}")


class ChannelError(Exception):
    """Base of the device channel's errors."""


class ChannelProtocolError(ChannelError):
    """The peer sent something ``chub.device.v1`` does not allow. The message says what."""


class HelloRefused(ChannelError):
    """The other end of the device channel did not prove it holds the device key."""


class LinkStalled(ChannelError):
    """The device stopped answering (no hello, or no ack, within its deadline)."""


class MessageType(enum.StrEnum):
    CMD = "cmd"
    HELLO = "hello"
    AUTH = "auth"
    ACK = "ack"
    NACK = "nack"
    TICKET = "ticket"


@attrs.frozen(kw_only=True)
class Hello:
    device_id: str
    kind: str
    firmware: str
    nonce: str | None = None  # 32 hex: the device's challenge to the box (devices with a key)


@attrs.frozen(kw_only=True)
class Auth:
    """The hello's proof: box -> device carries the box's ``nonce`` too; device -> box not."""

    proof: str
    nonce: str | None = None


@attrs.frozen(kw_only=True)
class Ack:
    id: str


@attrs.frozen(kw_only=True)
class Nack:
    id: str
    reason: str
    retry: bool


@attrs.frozen(kw_only=True)
class AskTicket:
    """A person pressed the device's own button for the box's status ticket (a printer's
    feed or status key, held): the box prints it on that device."""


DeviceMessage = Hello | Auth | Ack | Nack | AskTicket


@attrs.frozen(kw_only=True)
class Command:
    """One command to one device. ``body`` is its JSON object, already encoded (compact),
    as stored in the outbox, so sending never re-encodes it."""

    id: str
    seq: int
    kind: str
    expires_at: float | None
    body: str


def check_command_id(value: object) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ChannelProtocolError(f"a command id is 1 to {MAX_ID_CHARS} of the characters A-Z a-z 0-9 . _ : -, "
                                   f"got {_show(value)}")
    return value


def check_kind(value: object) -> str:
    if not isinstance(value, str) or len(value) > MAX_KIND_CHARS or not _KIND.fullmatch(value):
        raise ChannelProtocolError(f"a command kind is a dotted lower-case name of at most {MAX_KIND_CHARS} "
                                   f"characters (e.g. order.created), got {_show(value)}")
    return value


def encode_body(body: Mapping[str, Any]) -> str:
    """A command body as compact JSON, refused if it is not a finite JSON object or too big."""
    if not isinstance(body, Mapping):
        raise ChannelProtocolError(f"a command body is a JSON object, got {type(body).__name__}")
    try:
        text = json.dumps(dict(body), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ChannelProtocolError(f"a command body must be plain JSON: {exc}") from exc
    if len(text.encode("utf-8")) > MAX_BODY_BYTES:
        raise ChannelProtocolError(f"a command body is at most {MAX_BODY_BYTES} bytes of JSON")
    return text


def encode_command(command: Command) -> str:
    """The ``cmd`` message for ``command``; the stored body is spliced in unchanged."""
    head = json.dumps({"t": "cmd", "id": command.id, "seq": command.seq, "kind": command.kind,
                       "expires_at": command.expires_at}, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False)
    return f'{head[:-1]},"body":{command.body}}}'


def encode_device_message(message: DeviceMessage) -> str:
    data: dict[str, Any]
    if isinstance(message, Hello):
        data = {"t": "hello", "device_id": message.device_id, "kind": message.kind, "firmware": message.firmware}
        if message.nonce is not None:
            data["nonce"] = message.nonce
    elif isinstance(message, Auth):
        data = {"t": "auth", "proof": message.proof}
    elif isinstance(message, Ack):
        data = {"t": "ack", "id": message.id}
    elif isinstance(message, AskTicket):
        data = {"t": "ticket"}
    else:
        data = {"t": "nack", "id": message.id, "reason": message.reason, "retry": message.retry}
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def parse_device_message(data: str | bytes) -> DeviceMessage:
    """One message from a device, or :class:`ChannelProtocolError` saying what is wrong."""
    obj = _load(data, MAX_DEVICE_MESSAGE_BYTES, "device message")
    t = obj.get("t")
    if t == MessageType.HELLO:
        nonce = obj.get("nonce")
        if nonce is not None and (not isinstance(nonce, str) or _NONCE.fullmatch(nonce) is None):
            raise ChannelProtocolError(f"hello: 'nonce' must be 32 lowercase hex characters, got {_show(nonce)}")
        return Hello(device_id=_text(obj, "device_id", t, 1, MAX_DEVICE_ID_CHARS),
                     kind=_text(obj, "kind", t, 1, MAX_KIND_CHARS),
                     firmware=_text(obj, "firmware", t, 0, MAX_FIRMWARE_CHARS), nonce=nonce)
    if t == MessageType.AUTH:
        return Auth(proof=_proof(obj, t))
    if t == MessageType.ACK:
        return Ack(id=_text(obj, "id", t, 1, MAX_ID_CHARS))
    if t == MessageType.NACK:
        retry = obj.get("retry")
        if not isinstance(retry, bool):
            raise ChannelProtocolError(f"nack: 'retry' must be true or false, got {_show(retry)}")
        return Nack(id=_text(obj, "id", t, 1, MAX_ID_CHARS), reason=_text(obj, "reason", t, 0, MAX_REASON_CHARS),
                    retry=retry)
    if t == MessageType.TICKET:
        return AskTicket()
    raise ChannelProtocolError(f"'t' must be one of hello, auth, ack, nack, ticket from a device, got {_show(t)}")


def _proof(obj: Mapping[str, Any], t: str) -> str:
    proof = obj.get("proof")
    if not isinstance(proof, str) or _PROOF.fullmatch(proof) is None:
        raise ChannelProtocolError(f"{t}: 'proof' must be 64 lowercase hex characters, got {_show(proof)}")
    return proof


def encode_box_auth(nonce: str, proof: str) -> str:
    """The box's half of the hello: its nonce and its proof of the key."""
    return json.dumps({"t": "auth", "nonce": nonce, "proof": proof}, separators=(",", ":"))


def parse_box_auth(data: str | bytes) -> Auth:
    """The box's ``auth`` message, as a device reads it."""
    obj = _load(data, MAX_DEVICE_MESSAGE_BYTES, "box auth")
    if obj.get("t") != MessageType.AUTH:
        raise ChannelProtocolError(f"'t' must be auth from the box before any command, got {_show(obj.get('t'))}")
    nonce = obj.get("nonce")
    if not isinstance(nonce, str) or _NONCE.fullmatch(nonce) is None:
        raise ChannelProtocolError(f"auth: 'nonce' must be 32 lowercase hex characters, got {_show(nonce)}")
    return Auth(proof=_proof(obj, "auth"), nonce=nonce)


def parse_command(data: str | bytes) -> Command:
    """One ``cmd`` message, as a device reads it (the simulator and device libraries)."""
    obj = _load(data, MAX_COMMAND_BYTES, "command")
    if obj.get("t") != MessageType.CMD:
        raise ChannelProtocolError(f"'t' must be cmd from the box, got {_show(obj.get('t'))}")
    seq = obj.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise ChannelProtocolError(f"cmd: 'seq' must be an integer of 1 or more, got {_show(seq)}")
    expires_at = obj.get("expires_at")
    if expires_at is not None and (isinstance(expires_at, bool) or not isinstance(expires_at, int | float)
                                   or not math.isfinite(expires_at)):
        raise ChannelProtocolError(f"cmd: 'expires_at' must be a number or null, got {_show(expires_at)}")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise ChannelProtocolError(f"cmd: 'body' must be an object, got {_show(body)}")
    try:
        command_id = check_command_id(obj.get("id"))
        kind = check_kind(obj.get("kind"))
    except ChannelProtocolError as exc:
        raise ChannelProtocolError(f"cmd: {exc}") from None
    return Command(id=command_id, seq=seq, kind=kind,
                   expires_at=None if expires_at is None else float(expires_at), body=encode_body(body))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# One decoder for every message: json.loads with an option builds a new one per call, a
# measurable share of the device path's per-message cost (docs/device-channel.md).
_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant)


def _load(data: str | bytes, limit: int, what: str) -> dict[str, Any]:
    if isinstance(data, bytes):
        raise ChannelProtocolError(f"a {what} is a text frame; binary frames are not part of {SUBPROTOCOL}")
    # A str's UTF-8 size is at most 4 bytes a character: check the cheap bound first.
    if len(data) > limit or (len(data) * 4 > limit and len(data.encode("utf-8", "surrogatepass")) > limit):
        raise ChannelProtocolError(f"a {what} is at most {limit} bytes")
    try:
        obj = _DECODER.decode(data)
    except (ValueError, RecursionError) as exc:
        raise ChannelProtocolError(f"a {what} must be JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ChannelProtocolError(f"a {what} must be a JSON object, got {type(obj).__name__}")
    return obj


def _text(obj: Mapping[str, Any], key: str, t: str, least: int, most: int) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not least <= len(value) <= most:
        raise ChannelProtocolError(f"{t}: {key!r} must be a string of {least} to {most} characters, "
                                   f"got {_show(value)}")
    return value


def _show(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, str):
        return repr(value[:40] + ("..." if len(value) > 40 else ""))
    if isinstance(value, bool | int) or (isinstance(value, float) and math.isfinite(value)):
        return f"{type(value).__name__} {value!r}"
    return type(value).__name__
