"""The discovery wire format v1, the reply rate limiter and the beacon timer: pure, no sockets."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from appliance.protocol import discovery as wire
from appliance.protocol.ratelimit import RateLimiter, RateVerdict

HEADER = b"CHUB\x01"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "discovery.md"

# --- strategies -------------------------------------------------------------------------

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", fullmatch=True)
kinds = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}", fullmatch=True)
names = st.text(st.characters(exclude_categories=("Cc", "Cs"), exclude_characters="\u202a\u202b\u202c\u202d\u202e"
                              "\u2066\u2067\u2068\u2069"), max_size=100)
nonces = st.from_regex(r"[\x21-\x7e]{0,64}", fullmatch=True)
addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)
port_maps = st.dictionaries(st.from_regex(r"[a-z][a-z0-9_]{0,31}", fullmatch=True), st.integers(0, 65535),
                            min_size=1, max_size=12)
timestamps = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2**53), 2**53).map(float))
sigs = st.one_of(st.none(), st.from_regex(r"[0-9a-f]{64}", fullmatch=True))

probes = st.builds(wire.Probe, device_id=ids, kind=kinds, name=names, port=st.integers(0, 65535), nonce=nonces)
announces = st.builds(wire.Announce, appliance_id=ids, store_id=st.none() | ids, name=names,
                      firmware=st.from_regex(r"[\x21-\x7e]{1,32}", fullmatch=True), address=addresses,
                      ports=port_maps, nonce=st.none() | nonces, ts=timestamps, sig=sigs)
messages = st.one_of(probes, announces)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def encode_or_skip(message: wire.Message) -> bytes:
    try:
        return wire.encode(message)
    except wire.DatagramTooLarge:
        assume(False)
        raise  # unreachable: assume() stops the example


def decode_or_error(data: bytes) -> wire.Message | wire.DiscoveryError:
    try:
        return wire.decode(data)
    except wire.DiscoveryError as exc:
        assert exc.reason in {"too_large", "bad_magic", "bad_version", "bad_json", "bad_field", "unknown_type"}
        return exc


def probe_dict(**changes: Any) -> dict[str, Any]:
    base = {"type": "probe", "device_id": "pos-1", "kind": "pos", "name": "Till 1", "port": 8081, "nonce": "n1"}
    base.update(changes)
    return base


def datagram(obj: Any) -> bytes:
    return HEADER + json.dumps(obj).encode()


# --- decode: anything in, a message or DiscoveryError out --------------------------------


@given(st.binary(max_size=1400))
def test_any_bytes_decode_or_raise_the_discovery_error(data: bytes) -> None:
    decode_or_error(data)


@given(st.binary(max_size=1300))
def test_any_body_after_a_valid_header_decodes_or_raises_the_discovery_error(body: bytes) -> None:
    decode_or_error(HEADER + body)


@given(json_values)
def test_any_json_body_decodes_or_raises_the_discovery_error(value: Any) -> None:
    decode_or_error(datagram(value))


@given(key=st.sampled_from(sorted(probe_dict())), value=json_values)
def test_a_probe_with_any_value_in_any_key_decodes_or_is_invalid(key: str, value: Any) -> None:
    result = decode_or_error(datagram(probe_dict(**{key: value})))
    if isinstance(result, wire.DiscoveryError):
        assert isinstance(result, wire.InvalidMessage | wire.BadJson | wire.DatagramTooLarge)


@given(key=st.sampled_from(["device_id", "kind", "name", "port", "nonce"]))
def test_a_missing_key_makes_a_probe_invalid(key: str) -> None:
    obj = probe_dict()
    del obj[key]
    with pytest.raises(wire.InvalidMessage, match=f"missing key.*{key}"):
        wire.decode(datagram(obj))


@pytest.mark.parametrize(("data", "error", "match"), [
    (b"", wire.BadMagic, "magic"),
    (b"SSDP\x01{}", wire.BadMagic, "magic"),
    (b"CHUB", wire.UnsupportedVersion, "none"),
    (b"CHUB\x02{}", wire.UnsupportedVersion, "version 2"),
    (HEADER + b"\xff{}", wire.BadJson, "UTF-8"),
    (HEADER + b"[1]", wire.BadJson, "object"),
    (HEADER + b'{"type":"probe"} x', wire.BadJson, "JSON"),
    (HEADER + b"[" * 1100, wire.BadJson, "JSON"),
    (HEADER + b'{"type":"hello"}', wire.UnknownType, "probe or announce"),
    (HEADER + b'{"type":["probe"]}', wire.UnknownType, "probe or announce"),
    (datagram(probe_dict(port=True)), wire.InvalidMessage, "port"),
    (datagram(probe_dict(port=-1)), wire.InvalidMessage, "port"),
    (datagram(probe_dict(port=65536)), wire.InvalidMessage, "port"),
    (datagram(probe_dict(port="8081")), wire.InvalidMessage, "port"),
    (datagram(probe_dict(device_id="")), wire.InvalidMessage, "device_id"),
    (datagram(probe_dict(device_id="a/b")), wire.InvalidMessage, "device_id"),
    (datagram(probe_dict(name="x" * 101)), wire.InvalidMessage, "at most 100"),
    (datagram(probe_dict(name="bad\u202eeman")), wire.InvalidMessage, "U\\+202E"),
    (HEADER + b'{"type":"probe","device_id":"a","kind":"k","name":"\\ud800","port":1,"nonce":""}',
     wire.InvalidMessage, "U\\+D800"),
    (HEADER + b'{"type":"probe","type":"probe"}', wire.BadJson, "twice"),
    (HEADER + b'{"type":"announce","ts":NaN}', wire.BadJson, "NaN"),
    (HEADER + b'{"type":"announce","ts":Infinity}', wire.BadJson, "Infinity"),
    (HEADER + b"{" + b" " * 1200 + b"}", wire.DatagramTooLarge, "1200"),
])
def test_bad_datagrams_get_their_own_error(data: bytes, error: type[wire.DiscoveryError], match: str) -> None:
    with pytest.raises(error, match=match):
        wire.decode(data)


def test_announce_ts_bounds() -> None:
    good = {"type": "announce", "appliance_id": "box-1", "store_id": None, "name": "b", "firmware": "1.0",
            "address": "10.0.0.1", "ports": {"admin": 80}, "nonce": None, "ts": 1, "sig": None}
    assert isinstance(wire.decode(datagram(good)), wire.Announce)
    huge = datagram({**good, "ts": 12345}).replace(b"12345", b"1e400")  # parses as float inf
    with pytest.raises(wire.InvalidMessage, match="finite"):
        wire.decode(huge)
    for bad in ({"ts": 10**400}, {"ts": "now"}, {"ports": {}}, {"ports": {"Admin": 80}},
                {"ports": {"admin": 70000}}, {"address": "10.0.0.256"}, {"sig": "ABC"}, {"store_id": 7}):
        with pytest.raises(wire.InvalidMessage):
            wire.decode(datagram({**good, **bad}))


# --- encode/decode round trip, forward compatibility ---------------------------------------


@given(messages)
def test_encode_decode_round_trip(message: wire.Message) -> None:
    data = encode_or_skip(message)
    assert data.startswith(HEADER)
    assert len(data) <= wire.MAX_DATAGRAM
    assert wire.decode(data) == message


@given(messages, st.dictionaries(st.text(max_size=8).filter(lambda k: k not in probe_dict() and k not in {
    "appliance_id", "store_id", "firmware", "address", "ports", "ts", "sig"}), json_values, max_size=3))
def test_unknown_keys_are_ignored(message: wire.Message, extra: dict[str, Any]) -> None:
    obj = json.loads(encode_or_skip(message)[5:])
    data = HEADER + json.dumps({**obj, **extra}).encode()
    assume(len(data) <= wire.MAX_DATAGRAM)
    assert wire.decode(data) == message


def test_encode_refuses_a_datagram_over_the_limit() -> None:
    big = wire.Announce(appliance_id="box-1", store_id=None, name="n" * 100, firmware="1.0", address="10.0.0.1",
                        ports={f"role_{i:02d}{'x' * 22}": 65535 for i in range(32)}, nonce=None, ts=0.0)
    with pytest.raises(wire.DatagramTooLarge, match="1200"):
        wire.encode(big)


def test_constructing_an_invalid_message_raises_the_discovery_error() -> None:
    with pytest.raises(wire.InvalidMessage, match="port"):
        wire.Probe(device_id="a", kind="k", name="", port=65536, nonce="")


def test_clean_name_makes_any_text_a_valid_name() -> None:
    name = wire.clean_name("shop\n\x00box\u202e" + "y" * 200)
    assert name.startswith("shopbox")
    assert len(name) == wire.MAX_NAME
    wire.Probe(device_id="a", kind="k", name=name, port=1, nonce="")


# --- signatures -----------------------------------------------------------------------------


keys = st.binary(min_size=1, max_size=64)


@given(announces, keys, keys)
def test_a_signature_verifies_only_with_the_right_key(announce: wire.Announce, key: bytes, other: bytes) -> None:
    # HMAC pads short keys with zero bytes, so b"k" and b"k\0" are one key (RFC 2104).
    assume(key.rstrip(b"\0") != other.rstrip(b"\0"))
    try:
        signed = wire.sign(announce, key)
    except wire.DatagramTooLarge:
        assume(False)
        raise
    assert wire.verify(signed, key)
    assert not wire.verify(signed, other)
    decoded = wire.decode(signed)
    assert isinstance(decoded, wire.Announce)
    assert attrs.evolve(decoded, sig=None) == attrs.evolve(announce, sig=None)


@given(announces, keys, st.data())
def test_a_signature_verifies_only_over_the_untouched_body(announce: wire.Announce, key: bytes,
                                                           data: st.DataObject) -> None:
    try:
        signed = wire.sign(announce, key)
    except wire.DatagramTooLarge:
        assume(False)
        raise
    position = data.draw(st.integers(0, len(signed) - 1))
    flip = data.draw(st.integers(1, 255))
    tampered = bytearray(signed)
    tampered[position] ^= flip
    assert not wire.verify(bytes(tampered), key)
    assert not wire.verify(signed[:position] + signed[position + 1:], key)
    assert not wire.verify(signed + b" ", key)


def test_the_signed_message_is_the_datagram_with_sig_null() -> None:
    import hashlib
    import hmac

    announce = wire.Announce(appliance_id="box-1", store_id="store-9", name="Shop", firmware="1.0",
                             address="10.0.0.2", ports={"admin": 80}, nonce="abc", ts=1.5)
    signed = wire.sign(announce, b"k")
    unsigned = wire.encode(announce)  # sig None
    assert unsigned.endswith(b',"sig":null}')
    assert signed == unsigned[:-5] + b'"' + hmac.new(b"k", unsigned, hashlib.sha256).hexdigest().encode() + b'"}'
    assert not wire.verify(unsigned, b"k")  # unsigned never verifies
    # A sig that is not the top-level key at the end does not verify either.
    moved = json.loads(signed[5:])
    moved = {"sig": moved.pop("sig"), **moved}
    assert not wire.verify(HEADER + json.dumps(moved, separators=(",", ":")).encode(), b"k")


def test_the_example_in_the_docs_verifies() -> None:
    text = DOCS.read_text("utf-8")
    key = re.search(r'store secret `([^`]+)`', text)
    example = re.search(r"```json\n(\{\"type\":\"announce\".*?\"sig\":\"[0-9a-f]{64}\"\})\n```", text)
    assert key is not None and example is not None, "docs/discovery.md lost its signed example"
    data = HEADER + example[1].encode()
    assert wire.verify(data, key[1].encode())
    assert not wire.verify(data, key[1].encode() + b"x")
    # The verifier the docs give device developers agrees.
    snippet = re.search(r"```python\n(.*?)```", text, re.S)
    assert snippet is not None
    scope: dict[str, Any] = {}
    exec(snippet[1], scope)
    assert scope["verify"](data, key[1].encode())
    assert not scope["verify"](data, b"wrong")
    assert not scope["verify"](data.replace(b"Martin", b"Martyn"), key[1].encode())
    unsigned = wire.encode(attrs.evolve(wire.decode(data), sig=None))  # type: ignore[misc]
    assert not scope["verify"](unsigned, key[1].encode())


# --- the reply rate limiter ---------------------------------------------------------------------


def test_one_source_gets_its_burst_then_its_rate() -> None:
    limiter = RateLimiter(rate_per_s=0.5, burst=3, global_rate_per_s=100, global_burst=100)
    assert [limiter.allow("a", 0.0) for _ in range(4)] == [RateVerdict.ALLOWED] * 3 + [RateVerdict.SOURCE_LIMITED]
    assert limiter.allow("b", 0.0) is RateVerdict.ALLOWED  # another source is not affected
    assert limiter.allow("a", 1.9) is RateVerdict.SOURCE_LIMITED
    assert limiter.allow("a", 2.0) is RateVerdict.ALLOWED
    assert limiter.allow("a", 1.0) is RateVerdict.SOURCE_LIMITED  # the clock going back refills nothing


def test_the_global_cap_holds_whatever_the_number_of_sources() -> None:
    limiter = RateLimiter(rate_per_s=1, burst=5, global_rate_per_s=2, global_burst=10)
    verdicts = [limiter.allow(f"10.0.{i // 250}.{i % 250}", 0.0) for i in range(100)]
    assert verdicts.count(RateVerdict.ALLOWED) == 10
    assert verdicts.count(RateVerdict.GLOBAL_LIMITED) == 90
    assert limiter.allow("10.9.9.9", 0.5) is RateVerdict.ALLOWED  # 2/s: one token back after 0.5 s
    assert limiter.allow("10.9.9.8", 0.5) is RateVerdict.GLOBAL_LIMITED


def test_the_source_table_is_bounded() -> None:
    limiter = RateLimiter(rate_per_s=1, burst=1, global_rate_per_s=1e9, global_burst=1e9, max_sources=8)
    for i in range(100):
        limiter.allow(str(i), float(i))
    assert len(limiter) == 8


@given(st.lists(st.tuples(st.sampled_from("abcd"), st.floats(0, 5)), max_size=200))
def test_no_source_and_no_total_ever_exceed_their_rate(events: list[tuple[str, float]]) -> None:
    limiter = RateLimiter(rate_per_s=0.5, burst=3, global_rate_per_s=2, global_burst=5)
    now, allowed, total = 0.0, {s: 0 for s in "abcd"}, 0
    for source, step in events:
        now += step
        if limiter.allow(source, now) is RateVerdict.ALLOWED:
            allowed[source] += 1
            total += 1
        assert allowed[source] <= 3 + 0.5 * now + 1e-9
        assert total <= 5 + 2 * now + 1e-9


# --- the beacon timer -------------------------------------------------------------------------


class FixedRandom(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


def test_beacons_are_due_at_start_then_every_interval_with_jitter() -> None:
    schedule = wire.BeaconSchedule(10.0, jitter=0.1, rng=FixedRandom(0.0))
    assert schedule.due(0.0)
    schedule.sent(0.0)
    assert schedule.next_due == pytest.approx(9.0)  # random() 0 -> the low end of +/-10%
    schedule = wire.BeaconSchedule(10.0, jitter=0.1, rng=FixedRandom(0.5))
    schedule.sent(3.0)
    assert schedule.next_due == 13.0
    assert not schedule.due(12.9)
    assert schedule.due(13.0)


def test_an_address_change_makes_a_beacon_due_now() -> None:
    schedule = wire.BeaconSchedule(10.0, rng=FixedRandom(0.5))
    assert schedule.addresses_seen((("10.0.0.255", "10.0.0.2"),), 0.0)
    schedule.sent(0.0)
    assert not schedule.addresses_seen((("10.0.0.255", "10.0.0.2"),), 4.0)
    assert not schedule.due(4.0)
    assert schedule.addresses_seen((("10.0.0.255", "10.0.0.3"),), 5.0)
    assert schedule.due(5.0)


@given(st.floats(0.1, 1000), st.floats(0, 0.99), st.floats(0, 1e6), st.integers(0, 2**32))
def test_the_jittered_interval_stays_within_its_bounds(interval: float, jitter: float, now: float, seed: int) -> None:
    schedule = wire.BeaconSchedule(interval, jitter=jitter, rng=random.Random(seed))
    schedule.sent(now)
    gap = schedule.next_due - now
    assert interval * (1 - jitter) - 1e-6 <= gap <= interval * (1 + jitter) + 1e-6


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="burst"):
        RateLimiter(rate_per_s=1, burst=0, global_rate_per_s=1, global_burst=1)
    with pytest.raises(ValueError, match="rate_per_s"):
        RateLimiter(rate_per_s=1, burst=1, global_rate_per_s=-1, global_burst=1)
    with pytest.raises(ValueError, match="max_sources"):
        RateLimiter(rate_per_s=1, burst=1, global_rate_per_s=1, global_burst=1, max_sources=0)
