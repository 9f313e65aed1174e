"""Pads the proton peer's performatives to every field, as Service Bus itself sends them.

AMQP 1.0 (§1.4 of part 1) lets a sender leave out a performative's trailing fields when
they hold their default, and proton does: its Open stops after the last field it sets, its
Begin never carries ``properties``. Service Bus sends them in full, and azure-servicebus
before 7.15 relies on that: 7.14.3 (Debian's python3-azure, the image's) reads
``frame[4]`` and ``frame[9]`` of an Open, ``frame[7]`` of a Begin, ``frame[13]`` of an
Attach without checking the length, and its decoder knows only list8 and list32 as a
performative's list (not list0). 7.15 pads what it receives itself, so padding here
changes nothing for it.

:class:`PerformativePadder` is sans-I/O: ``feed()`` takes the peer's outgoing bytes as
they come (any split), returns the bytes to send on, each frame whole. Protocol headers
pass through; every AMQP and SASL performative's list is re-encoded with all its fields,
an omitted field (or an explicit null) given the field's default from the specification
(null where the default is none), as list8 or list32; frame payloads that follow the list
(a transfer's message) and empty frames (heartbeats) are kept byte for byte.
"""

from __future__ import annotations

import struct

__all__ = ["FIELD_DEFAULTS", "FrameError", "PerformativePadder", "pad_performative", "split_fields"]

_NULL = b"\x40"
_FALSE = b"\x42"
_UINT_MAX = b"\x70\xff\xff\xff\xff"
_USHORT_MAX = b"\x60\xff\xff"
_UBYTE = {0: b"\x50\x00", 2: b"\x50\x02"}

# Descriptor code -> each field's default, encoded; ``_NULL`` where the field has none.
# AMQP 1.0 part 2 §2.7 (transport) and part 5 §5.3.3 (SASL).
FIELD_DEFAULTS: dict[int, tuple[bytes, ...]] = {
    # open: container-id hostname max-frame-size channel-max idle-time-out outgoing-locales
    # incoming-locales offered-capabilities desired-capabilities properties
    0x10: (_NULL, _NULL, _UINT_MAX, _USHORT_MAX, *[_NULL] * 6),
    # begin: remote-channel next-outgoing-id incoming-window outgoing-window handle-max
    # offered-capabilities desired-capabilities properties
    0x11: (*[_NULL] * 4, _UINT_MAX, *[_NULL] * 3),
    # attach: name handle role snd-settle-mode (mixed) rcv-settle-mode (first) source target
    # unsettled incomplete-unsettled initial-delivery-count max-message-size
    # offered-capabilities desired-capabilities properties
    0x12: (*[_NULL] * 3, _UBYTE[2], _UBYTE[0], *[_NULL] * 3, _FALSE, *[_NULL] * 5),
    # flow: next-incoming-id incoming-window next-outgoing-id outgoing-window handle
    # delivery-count link-credit available drain echo properties
    0x13: (*[_NULL] * 8, _FALSE, _FALSE, _NULL),
    # transfer: handle delivery-id delivery-tag message-format settled more rcv-settle-mode
    # state resume aborted batchable
    0x14: (*[_NULL] * 5, _FALSE, _NULL, _NULL, _FALSE, _FALSE, _FALSE),
    # disposition: role first last settled state batchable
    0x15: (_NULL, _NULL, _NULL, _FALSE, _NULL, _FALSE),
    0x16: (_NULL, _FALSE, _NULL),  # detach: handle closed error
    0x17: (_NULL,),  # end: error
    0x18: (_NULL,),  # close: error
    0x40: (_NULL,),  # sasl-mechanisms: sasl-server-mechanisms
    0x41: (_NULL, _NULL, _NULL),  # sasl-init: mechanism initial-response hostname
    0x42: (_NULL,),  # sasl-challenge
    0x43: (_NULL,),  # sasl-response
    0x44: (_NULL, _NULL),  # sasl-outcome: code additional-data
}

_SASL_OUTCOME = 0x44
_FRAME_AMQP, _FRAME_SASL = 0, 1
_HEADER = 8  # "AMQP" + protocol id + version, and a frame's fixed header
_MAX_FRAME = 1 << 24  # the peer's frames are far smaller; a larger size means a broken stream


class FrameError(ValueError):
    """The byte stream is not the AMQP this padder understands."""


def _value_end(buf: bytes, i: int) -> int:
    """The index just past the AMQP-encoded value starting at ``buf[i]`` (part 1 §1.6)."""
    code = buf[i]
    if code == 0x00:  # described: the descriptor, then the value
        return _value_end(buf, _value_end(buf, i + 1))
    width = code >> 4
    fixed = {0x4: 0, 0x5: 1, 0x6: 2, 0x7: 4, 0x8: 8, 0x9: 16}
    if width in fixed:
        end = i + 1 + fixed[width]
    elif width in (0xA, 0xC, 0xE):  # one-byte size
        end = i + 2 + buf[i + 1]
    elif width in (0xB, 0xD, 0xF):  # four-byte size
        end = i + 5 + struct.unpack_from(">I", buf, i + 1)[0]
    else:
        raise FrameError(f"unknown AMQP type constructor 0x{code:02x}")
    if end > len(buf):
        raise FrameError(f"an AMQP value (constructor 0x{code:02x}) runs past the end of its frame")
    return end


def split_fields(body: bytes) -> tuple[int, list[bytes], bytes]:
    """A frame body -> (descriptor code, each list field's encoding, what follows the list)."""
    if len(body) < 3 or body[0] != 0x00:
        raise FrameError("a frame body must start with a described performative")
    if body[1] == 0x53:  # smallulong
        code, i = body[2], 3
    elif body[1] == 0x80:  # ulong
        code, i = struct.unpack_from(">Q", body, 2)[0], 10
    else:
        raise FrameError(f"a performative's descriptor must be a ulong, got constructor 0x{body[1]:02x}")
    kind = body[i]
    if kind == 0x45:  # list0
        return code, [], body[i + 1:]
    if kind == 0xC0:
        count, start = body[i + 2], i + 3
    elif kind == 0xD0:
        count, start = struct.unpack_from(">I", body, i + 5)[0], i + 9
    else:
        raise FrameError(f"a performative must be a list, got constructor 0x{kind:02x}")
    end = _value_end(body, i)
    fields, j = [], start
    for _ in range(count):
        k = _value_end(body, j)
        fields.append(body[j:k])
        j = k
    if j != end:
        raise FrameError(f"performative 0x{code:02x}: its fields do not fill its list")
    return code, fields, body[end:]


def pad_performative(body: bytes) -> bytes:
    """A frame body with its performative's every field present (defaults where omitted or null)."""
    code, fields, rest = split_fields(body)
    defaults = FIELD_DEFAULTS.get(code)
    if defaults is None:
        raise FrameError(f"unknown performative 0x{code:02x}")
    if len(fields) > len(defaults):
        raise FrameError(f"performative 0x{code:02x} has {len(fields)} fields, at most {len(defaults)} exist")
    full = [f if f != _NULL else d for f, d in zip(fields, defaults, strict=False)] + list(defaults[len(fields):])
    items = b"".join(full)
    if len(items) + 1 <= 0xFF:
        listed = bytes((0xC0, len(items) + 1, len(full))) + items
    else:
        listed = b"\xd0" + struct.pack(">II", len(items) + 4, len(full)) + items
    return b"\x00\x53" + bytes((code,)) + listed + rest


class PerformativePadder:
    """One direction of one connection (the peer's outgoing bytes), fed in any pieces."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._want_header = True  # at the start, and after a SASL outcome

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        out = bytearray()
        while True:
            if self._want_header:
                if len(self._buf) < _HEADER:
                    break
                if self._buf[:4] != b"AMQP":
                    raise FrameError(f"expected an AMQP protocol header, got {bytes(self._buf[:8])!r}")
                out += self._buf[:_HEADER]
                del self._buf[:_HEADER]
                self._want_header = False
                continue
            if len(self._buf) < _HEADER:
                break
            size, doff, ftype = struct.unpack_from(">IBB", self._buf)
            if not _HEADER <= size <= _MAX_FRAME or doff < 2:
                raise FrameError(f"bad frame header: size {size}, data offset {doff}")
            if len(self._buf) < size:
                break
            frame = bytes(self._buf[:size])
            del self._buf[:size]
            head, body = frame[: doff * 4], frame[doff * 4:]
            if not body or ftype not in (_FRAME_AMQP, _FRAME_SASL):  # an empty frame, or not ours
                out += frame
                continue
            padded = pad_performative(body)
            out += struct.pack(">I", len(head) + len(padded)) + head[4:] + padded
            if ftype == _FRAME_SASL and body[:3] == b"\x00\x53" + bytes((_SASL_OUTCOME,)):
                self._want_header = True  # the AMQP protocol header follows the SASL outcome
        return bytes(out)
