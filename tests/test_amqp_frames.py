"""The test double's front pads the peer's performatives to every field (tests.amqp.frames).

The image's azure-servicebus (7.14.3, Debian's) indexes fields of Open, Begin and Attach
without checking how many came, and decodes only list8/list32 performatives; the suite's
7.15 pads whatever it gets. The last test runs the suite's SDK with 7.14.3's frame decoder
against the real peer through its front: it fails if the front sends a short performative.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from azure.servicebus import ServiceBusMessage
from azure.servicebus._pyamqp import _decode, _transport

from tests.amqp import fixtures
from tests.amqp.frames import FIELD_DEFAULTS, FrameError, PerformativePadder, pad_performative, split_fields

amqp_server = fixtures.amqp_server
queue_name = fixtures.queue_name

SASL_HEADER = b"AMQP\x03\x01\x00\x00"
AMQP_HEADER = b"AMQP\x00\x01\x00\x00"


def strict_decode_frame(data: memoryview) -> tuple[int, list[Any]]:
    """azure-servicebus 7.14.3's ``decode_frame``: no padding, list8 or list32 only."""
    frame_type = data[2]
    if data[3] == 0xD0:
        count = struct.unpack(">i", data[8:12])[0]
        buffer = data[12:]
    else:
        count = data[5]
        buffer = data[6:]
    fields: list[Any] = [None] * count
    for i in range(count):
        buffer, fields[i] = _decode._DECODE_BY_CONSTRUCTOR[buffer[0]](buffer[1:])
    if frame_type == 20:
        fields.append(buffer)
    return frame_type, fields


def frame(body: bytes, ftype: int = 0, channel: int = 0) -> bytes:
    return struct.pack(">IBBH", 8 + len(body), 2, ftype, channel) + body


def listed(code: int, *fields: bytes) -> bytes:
    items = b"".join(fields)
    return b"\x00\x53" + bytes((code, 0xC0, len(items) + 1, len(fields))) + items


def str8(s: str) -> bytes:
    return b"\xa1" + bytes((len(s),)) + s.encode()


# What proton sends: an Open that stops after max-frame-size, a Begin without handle-max and
# properties, a Close as list0.
SHORT_OPEN = listed(0x10, str8("peer"), b"\x40", b"\x70\x00\x01\x00\x00")
SHORT_BEGIN = listed(0x11, b"\x60\x00\x00", b"\x43", b"\x70\x00\x00\x08\x00", b"\x70\x00\x00\x08\x00")
CLOSE0 = b"\x00\x53\x18\x45"
SASL_OUTCOME = listed(0x44, b"\x50\x00")


def test_an_open_gets_all_ten_fields_with_their_defaults() -> None:
    code, fields = strict_decode_frame(memoryview(pad_performative(SHORT_OPEN)))
    assert code == 0x10
    assert fields == [b"peer", None, 65536, 65535, None, None, None, None, None, None]
    assert len(strict_decode_frame(memoryview(SHORT_OPEN))[1]) == 3  # what 7.14.3 then indexes past


def test_explicit_nulls_take_the_default_and_list0_becomes_a_full_list() -> None:
    body = listed(0x10, str8("peer"), b"\x40", b"\x40")  # max-frame-size sent as null
    assert strict_decode_frame(memoryview(pad_performative(body)))[1][2] == 0xFFFFFFFF
    assert pad_performative(CLOSE0) == b"\x00\x53\x18\xc0\x02\x01\x40"
    _code, begin = strict_decode_frame(memoryview(pad_performative(SHORT_BEGIN)))
    assert begin == [0, 0, 2048, 2048, 0xFFFFFFFF, None, None, None]


def test_every_performative_pads_to_its_full_count_and_decodes_as_715_does() -> None:
    for code, defaults in FIELD_DEFAULTS.items():
        padded = pad_performative(b"\x00\x53" + bytes((code, 0x45)))
        _c, fields, rest = split_fields(padded)
        assert (len(fields), rest) == (len(defaults), b"")
        strict = strict_decode_frame(memoryview(padded))[1]
        if code != 0x14:  # 7.15's own padding agrees with the specification's defaults
            assert strict == _decode.decode_frame(memoryview(b"\x00\x53" + bytes((code, 0x45))))[1]


def test_a_transfers_payload_is_kept_and_lands_at_index_11() -> None:
    payload = b"\x00\x53\x75\xa0\x05hello"
    body = listed(0x14, b"\x43", b"\x43", b"\xa0\x02ab") + payload
    code, fields = strict_decode_frame(memoryview(pad_performative(body)))
    assert code == 0x14 and len(fields) == 12 and bytes(fields[11]) == payload


def test_a_long_list_goes_to_list32() -> None:
    body = listed(0x10, str8("c" * 170), str8("h" * 76))  # fits list8; padded, it does not
    padded = pad_performative(body)
    assert padded[3] == 0xD0
    assert strict_decode_frame(memoryview(padded))[1][:2] == [b"c" * 170, b"h" * 76]


def test_the_stream_in_any_pieces_gives_the_same_whole_frames() -> None:
    heartbeat = struct.pack(">IBBH", 8, 2, 0, 0)
    stream = (SASL_HEADER + frame(SASL_OUTCOME, ftype=1) + AMQP_HEADER + frame(SHORT_OPEN)
              + frame(SHORT_BEGIN, channel=3) + heartbeat + frame(CLOSE0))
    whole = PerformativePadder().feed(stream)
    assert whole.startswith(SASL_HEADER)
    assert AMQP_HEADER in whole and heartbeat in whole
    padded_begin = pad_performative(SHORT_BEGIN)
    assert struct.pack(">IBBH", 8 + len(padded_begin), 2, 0, 3) + padded_begin in whole
    for cut in range(1, len(stream)):
        padder = PerformativePadder()
        assert padder.feed(stream[:cut]) + padder.feed(stream[cut:]) == whole
    padder = PerformativePadder()
    assert b"".join(padder.feed(stream[i:i + 1]) for i in range(len(stream))) == whole


@pytest.mark.parametrize("bad", [
    b"HTTP/1.1 200 OK\r\n",  # not AMQP
    SASL_HEADER + struct.pack(">IBBH", 4, 2, 1, 0),  # a frame smaller than its header
    AMQP_HEADER + frame(b"\x00\x53\x10\xa1\x01x"),  # a performative that is not a list
    AMQP_HEADER + frame(b"\x00\x53\x10\xc0\x05\x02\x40\xa1\x09x"),  # a field past its list
    AMQP_HEADER + frame(b"\x00\x53\x77\x45"),  # no such performative
])
def test_what_it_cannot_read_is_an_error_not_a_guess(bad: bytes) -> None:
    with pytest.raises(FrameError):
        PerformativePadder().feed(bad)


def test_the_sdk_with_714s_decoder_talks_to_the_peer_through_the_front(
    amqp_server: fixtures.AmqpServer, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_transport, "decode_frame", strict_decode_frame)
    amqp_server.send(queue_name, ServiceBusMessage(b'{"order": 7}', message_id="o-7"))
    with amqp_server.receiver(queue_name) as receiver:
        [msg] = receiver.receive_messages(max_message_count=1, max_wait_time=5.0)
        assert msg.message_id == "o-7" and b"".join(msg.body) == b'{"order": 7}'
        receiver.complete_message(msg)
        assert receiver.peek_messages(5, sequence_number=1) == []
