"""The identity core: key derivation, comparison code, request signatures, replay, hello (the
signed-request check in both its forms, Python and native: tests/test_sigcheck.py)."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from appliance.protocol import identity as idp

_keys = st.binary(min_size=32, max_size=32).map(lambda b: idp.private_from_hex(b.hex()))
_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,20}", fullmatch=True)
_nonces = st.binary(min_size=16, max_size=16).map(bytes.hex)
_methods = st.sampled_from(["GET", "POST", "PUT", "DELETE"])
_paths = st.from_regex(r"/[A-Za-z0-9/%._-]{0,30}", fullmatch=True)
_queries = st.from_regex(r"([a-z]{1,5}=[A-Za-z0-9%]{0,8}(&[a-z]{1,5}=[a-z0-9]{0,4}){0,2})?", fullmatch=True)
_fast = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_fast
@given(device=_keys, box=_keys, third=_keys, device_id=_ids)
def test_both_ends_derive_the_same_key_and_a_third_party_does_not(device, box, third, device_id) -> None:
    dpub, bpub = idp.public_bytes(device), idp.public_bytes(box)
    assume(len({dpub, bpub, idp.public_bytes(third)}) == 3)
    on_device = idp.derive_device_key(device, bpub, device_id=device_id, device_public=dpub, box_public=bpub)
    on_box = idp.derive_device_key(box, dpub, device_id=device_id, device_public=dpub, box_public=bpub)
    assert on_device == on_box and len(on_box) == 32
    # A third party knows both public keys, and has a key pair of its own: with it, paired
    # with either public key, it gets another key.
    for peer in (dpub, bpub):
        guess = idp.derive_device_key(third, peer, device_id=device_id, device_public=dpub, box_public=bpub)
        assert guess != on_box
    # Bound to the device id and both public keys (HKDF info and salt).
    other_id = idp.derive_device_key(box, dpub, device_id=device_id + "x", device_public=dpub, box_public=bpub)
    assert other_id != on_box


def test_a_low_order_public_key_is_refused() -> None:
    with pytest.raises(idp.BadKey):
        idp.derive_device_key(idp.new_private_key(), bytes(32), device_id="d", device_public=bytes(32),
                              box_public=bytes(32))


@_fast
@given(device=_keys, box=_keys, dn=st.binary(min_size=16, max_size=16), bn=st.binary(min_size=16, max_size=16))
def test_the_comparison_code_is_six_digits_and_depends_on_everything(device, box, dn, bn) -> None:
    dpub, bpub = idp.public_bytes(device), idp.public_bytes(box)
    code = idp.comparison_code(dpub, bpub, dn, bn)
    assert len(code) == 6 and code.isdigit()
    assert idp.comparison_code(dpub, bpub, dn, bn) == code
    assert idp.commitment(dpub, dn) != idp.commitment(dpub, bytes(b ^ 1 for b in dn))


def test_the_code_spreads_over_all_six_digits() -> None:
    # A man in the middle gets one guess: the code must not favour a few values.
    pub = idp.public_bytes(idp.new_private_key())
    codes = {idp.comparison_code(pub, pub, n.to_bytes(16, "big"), bytes(16)) for n in range(2000)}
    assert len(codes) > 1950


def _sign(key: bytes, **kw: object) -> dict[str, str]:
    return idp.sign_request(key, **kw)  # type: ignore[arg-type]


def _lower(headers: dict[str, str]) -> dict[str, bytes]:
    """The signature headers as a server receives them: by lower-case name, the values bytes."""
    return {k.lower(): v.encode() for k, v in headers.items()}


@_fast
@given(key=st.binary(min_size=32, max_size=32), method=_methods, path=_paths, query=_queries,
       body=st.binary(max_size=200), created=st.integers(0, 10**12 - 1), nonce=_nonces, wrong=st.booleans())
def test_a_mac_key_and_the_raw_key_verify_alike(key, method, path, query, body, created, nonce, wrong) -> None:
    headers = _lower(_sign(key, device_id="pos-1", method=method, path=path, query=query, body=body,
                           created=created, nonce=nonce))
    signed = idp.parse_signature(headers)
    assert b"chub=" + signed.params == headers["signature-input"]
    verify_key = bytes(32) if wrong and key != bytes(32) else key
    outcomes = []
    for form in (verify_key, idp.MacKey(verify_key)):
        try:
            idp.verify_request(form, signed, method=method.encode(), path=path.encode(), query=query.encode(),
                               body=body)
            outcomes.append("ok")
        except idp.SignatureError as exc:
            outcomes.append(exc.reason)
    assert outcomes == ["bad_signature"] * 2 if verify_key != key else outcomes == ["ok"] * 2


def test_created_with_leading_zeros_is_malformed() -> None:
    """The Signature-Input is taken as the base's last line as sent, so only the form the
    profile writes is accepted: ``created=0012`` is refused as malformed, not checked."""
    headers = _lower(_sign(bytes(32), device_id="pos-1", method="GET", path="/v1/x", query="", body=b"",
                           created=12, nonce="ab" * 16))
    idp.parse_signature(headers)
    headers["signature-input"] = headers["signature-input"].replace(b"created=12;", b"created=0012;")
    with pytest.raises(idp.SignatureError, match="Signature-Input must be") as caught:
        idp.parse_signature(headers)
    assert caught.value.reason == "malformed"


def test_the_base_is_rfc_9421_shaped() -> None:
    base = idp.signature_base(b"post", b"/v1/sales", b"", idp.content_digest(b"{}").encode(),
                              b'("@method" "@path" "@query" "content-digest");created=1;nonce="n";keyid="k";'
                              b'alg="hmac-sha256"')
    assert base.decode().splitlines() == [
        '"@method": POST', '"@path": /v1/sales', '"@query": ?',
        '"content-digest": sha-256=:RBNvo1WzZ4oRRq0W9+hknpT7T8If536DEMBg9hyq/4o=:',
        '"@signature-params": ("@method" "@path" "@query" "content-digest");created=1;nonce="n";keyid="k";'
        'alg="hmac-sha256"']


def test_replays_and_stale_requests_are_refused() -> None:
    guard = idp.ReplayGuard(window_s=30, max_nonces=100)
    guard.check("a", created=1000, now=1000.5)
    with pytest.raises(idp.Replayed, match="used already"):
        guard.check("a", created=1000, now=1001)
    with pytest.raises(idp.Replayed, match="within 30 s"):
        guard.check("b", created=960, now=1000)
    with pytest.raises(idp.Replayed, match="within 30 s"):
        guard.check("b", created=1040, now=1000)
    # Once out of the window the nonce is forgotten, and the window refuses it anyway.
    with pytest.raises(idp.Replayed, match="within 30 s"):
        guard.check("a", created=1000, now=1031)
    assert len(guard) == 0


def test_a_full_guard_forgets_its_oldest_second_and_refuses_from_it_on() -> None:
    guard = idp.ReplayGuard(window_s=30, max_nonces=3)
    for nonce, created in (("a", 100), ("b", 100), ("c", 101)):
        guard.check(nonce, created=created, now=101.5)
    guard.check("d", created=102, now=102.5)  # full: the whole of second 100 is forgotten
    assert len(guard) == 2 and guard.floor == 100
    with pytest.raises(idp.Replayed, match="older than the oldest") as flood:
        guard.check("e", created=100, now=102.5)  # never "a" again, nor anything else from then
    assert flood.value.status == 429
    with pytest.raises(idp.Replayed, match="used already"):
        guard.check("c", created=101, now=102.5)
    guard.check("c", created=102, now=102.5)  # the same nonce in another second: another request
    # The window moves on: a second's nonces leave it together, once it is 30 s old.
    guard.check("f", created=102, now=131.6)  # second 101 gone ("c"), 102's three kept
    assert len(guard) == 3
    guard.check("g", created=133, now=133)  # second 102 gone at once
    assert len(guard) == 1


@settings(max_examples=40, deadline=None)
@given(events=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 60)), max_size=200))
def test_the_replay_guard_is_bounded_and_never_accepts_a_nonce_twice(events) -> None:
    guard = idp.ReplayGuard(window_s=10, max_nonces=8)
    accepted: set[tuple[str, float]] = set()
    now = 1000.0
    for nonce, step in events:
        now += step / 10
        created = now - (nonce % 5)
        try:
            guard.check(str(nonce), created=created, now=now)
        except idp.Replayed:
            continue
        # A replay is the same signed request: the same nonce with the same created.
        assert (str(nonce), created) not in accepted
        accepted.add((str(nonce), created))
        assert len(guard) <= 8


def test_the_hello_proofs_differ_by_side_and_check_in_constant_time() -> None:
    key, dn, bn = bytes(range(32)), b"d" * 16, b"b" * 16
    box, device = idp.box_proof(key, "kds-1", dn, bn), idp.device_proof(key, "kds-1", dn, bn)
    assert box != device
    idp.check_proof(box, box, "the box")
    with pytest.raises(idp.HelloFailed):
        idp.check_proof(box, device, "the box")
    with pytest.raises(idp.HelloFailed):
        idp.check_proof(box, idp.box_proof(bytes(32), "kds-1", dn, bn), "the box")
    assert box == hmac.new(key, b"chub hello v1 box\x00kds-1\x00" + dn + bn, hashlib.sha256).hexdigest()


def test_the_snippets_in_docs_device_api_agree_with_the_box() -> None:
    """docs/device-api.md's stdlib snippets sign, verify and prove exactly as the box does."""
    import os
    import re
    from pathlib import Path

    from appliance.protocol import discovery as wire

    doc = (Path(__file__).resolve().parent.parent / "docs" / "device-api.md").read_text("utf-8")
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    key = os.urandom(32)
    ns: dict[str, object] = {"key": key}
    exec(blocks[1].split("body = json.dumps")[0], ns)  # the signing function only: no network
    exec(blocks[2], ns)
    headers = ns["signed"]("POST", "/v1/sales", "a=1", b'{"a":1}', "pos-1", key)  # type: ignore[operator]
    signed = idp.parse_signature(_lower(headers))
    idp.verify_request(key, signed, method=b"POST", path=b"/v1/sales", query=b"a=1", body=b'{"a":1}')
    assert ns["verify"]("POST", "/v1/sales", "a=1", b'{"a":1}', headers, key)  # type: ignore[operator]
    assert not ns["verify"]("POST", "/v1/sales", "a=2", b'{"a":1}', headers, key)  # type: ignore[operator]
    exec(blocks[4], ns)
    assert wire.verify(ns["datagram"], key)  # type: ignore[arg-type]
    dn, bn = os.urandom(16), os.urandom(16)
    label = b"kds-1\x00" + dn + bn
    assert hmac.new(key, b"chub hello v1 box\x00" + label, hashlib.sha256).hexdigest() == \
        idp.box_proof(key, "kds-1", dn, bn)
    assert "b\"chub hello v1 box\\0\" + label" in blocks[3] and "b\"chub hello v1 device\\0\" + label" in blocks[3]


_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=70)
_json_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
_offer_fields = st.fixed_dictionaries({}, optional={
    "device_id": st.one_of(_ids, _json_values), "kind": st.one_of(st.just("kds"), _json_values),
    "name": st.one_of(st.just("Kitchen"), _json_values), "port": st.one_of(st.integers(-5, 70000), _json_values),
    "public_key": st.one_of(st.binary(min_size=32, max_size=32).map(bytes.hex), _json_values),
    "commitment": st.one_of(st.binary(min_size=32, max_size=32).map(bytes.hex), _json_values)})


@_fast
@given(data=st.one_of(_offer_fields, _json_values))
def test_any_enrollment_body_is_an_enrollment_or_a_400_naming_the_fields(data: object) -> None:
    from appliance.services.web.common import ApiError
    from appliance.services.web.enrollment import _parse_offer

    try:
        enrollment = _parse_offer(data, "10.0.0.5", "0" * 32, 1.0)
    except ApiError as exc:
        assert exc.status == 400 and exc.errors
        return
    assert isinstance(data, dict)
    assert 1 <= enrollment.port <= 65535 and len(enrollment.public_key) == 64 and enrollment.address == "10.0.0.5"
