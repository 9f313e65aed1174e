"""The signed-request check in both forms (appliance.protocol.sigcheck): the Python reference
and the native one (``_sigcheck.c``) verify the same requests, and accept and refuse exactly
the same inputs with the same SignatureError (reason, status and text), hostile bytes
included; the native one keeps its references and memory to itself.

The native tests skip when the extension is not built here (with why), and fail instead
where APPLIANCE_NATIVE_REQUIRED=1."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import hmac
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from appliance.protocol import identity as idp
from appliance.protocol import sigcheck

from .conftest import native_check

_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", fullmatch=True)
_nonces = st.binary(min_size=16, max_size=16).map(bytes.hex)
_methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "patch", "Get"])
_paths = st.from_regex(r"/[A-Za-z0-9/%._-]{0,30}", fullmatch=True)
_queries = st.from_regex(r"([a-z]{1,5}=[A-Za-z0-9%]{0,8}(&[a-z]{1,5}=[a-z0-9]{0,4}){0,2})?", fullmatch=True)
_fast = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])
_NAMES = ("signature-input", "signature", "content-digest")
_BLANKS = b" \t\r\n\x0b\x0c"


def _headers(key: bytes, **request: Any) -> dict[str, bytes]:
    """The signature headers as a server receives them: by lower-case name, the values bytes."""
    return {k.lower(): v.encode() for k, v in idp.sign_request(key, **request).items()}


def _outcome(check: sigcheck.Check, key: bytes, headers: dict[str, bytes], method: bytes, path: bytes,
             query: bytes, body: bytes) -> tuple[object, ...]:
    """What ``check`` makes of a request: what it read and "ok", or the refusal in full."""
    try:
        signed = check.parse(headers)
        read = (signed.keyid, signed.created, signed.nonce)
        check.verify(check.key(key), signed, method, path, query, body)
    except idp.SignatureError as exc:
        return (type(exc), exc.reason, exc.status, str(exc))
    return ("ok", *read)


def _same(native: sigcheck.Check, key: bytes, headers: dict[str, bytes], method: bytes = b"GET",
          path: bytes = b"/v1/x", query: bytes = b"", body: bytes = b"") -> tuple[object, ...]:
    python = _outcome(sigcheck.PYTHON, key, headers, method, path, query, body)
    assert _outcome(native, key, headers, method, path, query, body) == python, headers
    return python


@pytest.fixture
def native() -> sigcheck.Check:
    return native_check()


# --- each check on its own ----------------------------------------------------------------------


@_fast
@given(key=st.binary(min_size=32, max_size=32), device_id=_ids, method=_methods, path=_paths, query=_queries,
       body=st.binary(max_size=200), created=st.integers(0, 10**12 - 1), nonce=_nonces)
def test_a_signature_verifies(sig_check, key, device_id, method, path, query, body, created, nonce) -> None:
    headers = _headers(key, device_id=device_id, method=method, path=path, query=query, body=body, created=created,
                       nonce=nonce)
    signed = sig_check.parse(headers)
    assert (signed.keyid, signed.created, signed.nonce) == (device_id, created, nonce.encode())
    sig_check.verify(sig_check.key(key), signed, method.encode(), path.encode(), query.encode(), body)


@_fast
@given(key=st.binary(min_size=32, max_size=32), other_key=st.binary(min_size=32, max_size=32), method=_methods,
       path=_paths, query=_queries, body=st.binary(max_size=100), created=st.integers(0, 10**12 - 1), nonce=_nonces,
       change=st.sampled_from(["method", "path", "query", "body", "created", "nonce", "key", "keyid"]),
       data=st.data())
def test_any_change_fails_the_signature(sig_check, key, other_key, method, path, query, body, created, nonce,
                                        change, data) -> None:
    request = {"method": method, "path": path, "query": query, "body": body}
    headers = _headers(key, device_id="pos-1", created=created, nonce=nonce, **request)
    verify_key, expected = key, "bad_signature"
    if change == "method":
        request["method"] = data.draw(_methods.filter(lambda m: m.upper() != method.upper()))
    elif change == "path":
        request["path"] = data.draw(_paths.filter(lambda p: p != path))
    elif change == "query":
        request["query"] = data.draw(_queries.filter(lambda q: q != query))
    elif change == "body":
        request["body"], expected = data.draw(st.binary(max_size=100).filter(lambda b: b != body)), "digest"
    elif change == "created":
        new = data.draw(st.integers(0, 10**12 - 1).filter(lambda c: c != created))
        headers["signature-input"] = headers["signature-input"].replace(f"created={created};".encode(),
                                                                        f"created={new};".encode())
    elif change == "nonce":
        new_nonce = data.draw(_nonces.filter(lambda n: n != nonce))
        headers["signature-input"] = headers["signature-input"].replace(nonce.encode(), new_nonce.encode())
    elif change == "keyid":
        headers["signature-input"] = headers["signature-input"].replace(b'keyid="pos-1"', b'keyid="pos-2"')
    else:
        assume(other_key != key)
        verify_key = other_key
    signed = sig_check.parse(headers)
    with pytest.raises(idp.SignatureError) as refused:
        sig_check.verify(sig_check.key(verify_key), signed, request["method"].encode(),  # type: ignore[union-attr]
                         request["path"].encode(), request["query"].encode(),  # type: ignore[union-attr]
                         request["body"])
    assert refused.value.reason == expected and refused.value.status == 401


@_fast
@given(key=st.binary(max_size=200), message=st.binary(max_size=600))
def test_a_device_key_is_hmac_sha256(sig_check, key, message) -> None:
    """Either check's pre-keyed HMAC is RFC 2104's, for any key (longer than SHA-256's block
    too) and message, and does not show the key."""
    made = sig_check.key(key)
    assert made.digest(message) == hmac.new(key, message, hashlib.sha256).digest()  # type: ignore[attr-defined]
    assert repr(made).endswith("(...)")  # never the key


# --- the native check against the reference ------------------------------------------------------


_KEY = bytes(range(32))
_VALID = _headers(_KEY, device_id="pos-1", method="POST", path="/v1/sales", query="a=1", body=b"{}",
                  created=1_700_000_000, nonce="ab" * 16)


def _mutate(value: bytes, kind: str, data: st.DataObject) -> bytes:
    if kind == "flip" and value:
        at = data.draw(st.integers(0, len(value) - 1))
        return value[:at] + bytes([data.draw(st.integers(0, 255))]) + value[at + 1:]
    if kind == "delete" and value:
        at = data.draw(st.integers(0, len(value) - 1))
        return value[:at] + value[at + 1:]
    if kind == "insert":
        at = data.draw(st.integers(0, len(value)))
        return value[:at] + data.draw(st.binary(min_size=1, max_size=4)) + value[at:]
    if kind == "truncate":
        return value[:data.draw(st.integers(0, len(value)))]
    if kind == "extend":
        return value + data.draw(st.binary(min_size=1, max_size=300))
    if kind == "blanks":
        before, after = (data.draw(st.text(alphabet=_BLANKS.decode(), max_size=120)).encode() for _ in "ab")
        return before + value + after
    if kind == "non_ascii":
        at = data.draw(st.integers(0, len(value)))
        return value[:at] + data.draw(st.text(min_size=1, max_size=3).filter(lambda t: not t.isascii())).encode() \
            + value[at:]
    if kind == "random":
        return data.draw(st.binary(max_size=320))
    return value


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(data=st.data(), which=st.lists(st.sampled_from(_NAMES), min_size=1, max_size=3),
       kind=st.sampled_from(["flip", "delete", "insert", "truncate", "extend", "blanks", "non_ascii", "random",
                             "drop"]),
       method=st.sampled_from([b"POST", b"post", b"PoSt", b"GET", b"P\xc3\xa9ST", b""]),
       body=st.sampled_from([b"{}", b"", b"{ }"]), key=st.sampled_from([_KEY, bytes(32), _KEY * 3]))
def test_native_and_python_accept_and_refuse_the_same_inputs(native, data, which, kind, method, body, key) -> None:
    headers = dict(_VALID)
    for name in which:
        if kind == "drop":
            headers.pop(name, None)
        else:
            headers[name] = _mutate(headers[name], kind, data)
    _same(native, key, headers, method, b"/v1/sales", b"a=1", body)


@given(headers=st.dictionaries(st.sampled_from(_NAMES),
                               st.binary(max_size=300) | st.text(max_size=300).map(str.encode)))
@_fast
def test_any_header_bytes_get_the_same_answer_from_both(native, headers) -> None:
    outcome = _same(native, _KEY, headers)
    assert outcome[1] in ("unsigned", "malformed")


@pytest.mark.parametrize("name", _NAMES)
@pytest.mark.parametrize("length", [255, 256, 257, 300, 4096])
def test_blanks_up_to_and_past_the_header_cap(native, name, length) -> None:
    """A valid value padded with blanks to the cap passes (an HTTP parser drops them); one
    byte past the cap is refused as too long, before anything reads it."""
    value = _VALID[name]
    padded = b" " * ((length - len(value)) // 2) + value
    padded += b"\t" * (length - len(padded))
    outcome = _same(native, _KEY, {**_VALID, name: padded}, b"POST", b"/v1/sales", b"a=1", b"{}")
    assert outcome[0] == "ok" if length <= 256 else outcome[1:3] == ("malformed", 401)


def test_every_byte_around_and_inside_a_valid_value(native) -> None:
    """Each of the 256 byte values before, after and in place of each byte of each valid
    header: the same answer from both (which bytes count as blanks included)."""
    for name in _NAMES:
        value = _VALID[name]
        for byte in range(256):
            b = bytes([byte])
            for changed in (b + value, value + b, b + value + b):
                _same(native, _KEY, {**_VALID, name: changed}, b"POST", b"/v1/sales", b"a=1", b"{}")
        for at in range(len(value)):
            for byte in (0, 0x20, 0x22, 0x2F, 0x30, 0x39, 0x3A, 0x3D, 0x41, 0x61, 0x7F, 0x80, 0xFF):
                _same(native, _KEY, {**_VALID, name: value[:at] + bytes([byte]) + value[at + 1:]}, b"POST",
                      b"/v1/sales", b"a=1", b"{}")


@pytest.mark.parametrize(("created", "keyid"), [
    ("0", "p"), ("00", "p"), ("01", "p"), ("1", "p"), ("999999999999", "p"), ("1000000000000", "p"),
    ("9" * 12, "a" * 64), ("1", "a" * 65), ("1", "-a"), ("1", "a.b_c:d-e"), ("1", ""), ("", "p"), ("-1", "p"),
    ("1", "a b"), ("1", "a\"b"),
])
def test_created_and_keyid_at_their_edges(native, created, keyid) -> None:
    value = (f'chub=("@method" "@path" "@query" "content-digest");created={created};nonce="{"0" * 32}";'
             f'keyid="{keyid}";alg="hmac-sha256"').encode()
    _same(native, _KEY, {**_VALID, "signature-input": value})


def test_a_signature_whose_last_character_carries_spare_bits_reads_alike(native) -> None:
    """The 43rd base64 character holds two bits beyond the 32 bytes: the reference
    (binascii) ignores them, so the native check does too (the same MAC either way)."""
    signature = _VALID["signature"]
    last = signature[-3:-2]
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    value = alphabet.index(last)
    for spare in range(4):
        changed = signature[:-3] + alphabet[(value & ~3) | spare:][:1] + signature[-2:]
        outcome = _same(native, _KEY, {**_VALID, "signature": changed}, b"POST", b"/v1/sales", b"a=1", b"{}")
        assert outcome[0] == "ok"


def test_wrong_types_are_type_errors_not_crashes(native) -> None:
    module = sys.modules["appliance.protocol._sigcheck"]
    assert module.MAX_HEADER == idp._MAX_HEADER  # (the same cap, written in both)
    with pytest.raises(TypeError):
        native.parse([("signature-input", b"x")])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        native.parse({**_VALID, "signature-input": _VALID["signature-input"].decode()})  # type: ignore[dict-item]
    signed = native.parse(_VALID)
    key = native.key(_KEY)
    with pytest.raises(TypeError):
        native.verify(_KEY, signed, b"POST", b"/v1/sales", b"a=1", b"{}")
    with pytest.raises(TypeError):
        native.verify(key, idp.parse_signature(_VALID), b"POST", b"/v1/sales", b"a=1", b"{}")
    with pytest.raises(TypeError):
        native.verify(key, signed, "POST", b"/v1/sales", b"a=1", b"{}")
    with pytest.raises(TypeError):
        module.verify(key, signed, b"POST")
    with pytest.raises(TypeError):
        module.Signed()
    with pytest.raises(TypeError):
        native.key("not bytes")  # type: ignore[arg-type]
    native.verify(key, signed, b"POST", b"/v1/sales", b"a=1", b"{}")


def test_references_are_released_on_every_path(native) -> None:
    """Each header value is held by a read signature while it lives, and by nothing after,
    accepted or refused at any step."""
    key = native.key(_KEY)
    values = {name: bytes(bytearray(v)) for name, v in _VALID.items()}  # (fresh objects)
    before = {name: sys.getrefcount(v) for name, v in values.items()}
    signed = native.parse(values)
    native.verify(key, signed, b"POST", b"/v1/sales", b"a=1", b"{}")
    for bad in ((b"GET", b"{}"), (b"POST", b"{ }")):  # a bad signature, a bad digest
        with pytest.raises(idp.SignatureError):
            native.verify(key, signed, bad[0], b"/v1/sales", b"a=1", bad[1])
    del signed
    for name in _NAMES:  # refused at each header in turn
        with pytest.raises(idp.SignatureError):
            native.parse({**values, name: values[name][:-1]})
        with pytest.raises(idp.SignatureError):
            native.parse({k: v for k, v in values.items() if k != name})
    assert {name: sys.getrefcount(v) for name, v in values.items()} == before


def test_no_memory_is_kept_across_many_checks(native) -> None:
    """20,000 rounds of an accepted request and each refusal keep no memory (tracemalloc
    sees the C module's Python allocations too)."""
    key = native.key(_KEY)

    def rounds(n: int) -> None:
        for i in range(n):
            values = {name: bytes(bytearray(v)) for name, v in _VALID.items()}
            signed = native.parse(values)
            native.verify(key, signed, b"POST", b"/v1/sales", b"a=1", b"{}")
            for method, body in ((b"GET", b"{}"), (b"POST", b"{ }")):
                with contextlib.suppress(idp.SignatureError):
                    native.verify(key, signed, method, b"/v1/sales", b"a=1", body)
            with contextlib.suppress(idp.SignatureError):
                native.parse({**values, _NAMES[i % 3]: b"x" * (i % 300)})
            native.key(bytes([i % 256]) * 40).digest(b"m")

    rounds(2000)
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        rounds(20_000)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"{grown} bytes kept after 20,000 rounds"


def test_hostile_inputs_in_a_child_process_neither_crash_nor_hang(native) -> None:
    """A seeded corpus of hostile header values (random bytes of every length to past the
    cap, valid values cut, stretched and salted) through both checks in a child process: a
    crash would kill the child and a hang would meet the timeout; the answers must agree."""
    script = textwrap.dedent("""
        import random, sys
        from appliance.protocol import identity as idp, sigcheck
        from tests.test_sigcheck import _VALID, _KEY, _outcome
        rng = random.Random(16)
        native, n = sigcheck.NATIVE, 0
        for i in range(30000):
            headers = dict(_VALID)
            name = rng.choice(list(headers))
            value = headers[name]
            kind = i % 5
            if kind == 0:
                headers[name] = rng.randbytes(rng.randint(0, 600))
            elif kind == 1:
                headers[name] = value[:rng.randint(0, len(value))]
            elif kind == 2:
                headers[name] = value + rng.randbytes(rng.randint(0, 300))
            elif kind == 3:
                at = rng.randint(0, len(value) - 1)
                headers[name] = value[:at] + rng.randbytes(rng.randint(1, 8)) + value[at + 1:]
            else:
                headers[name] = b" " * rng.randint(0, 200) + value + b"\\t" * rng.randint(0, 200)
            args = (_KEY, headers, rng.choice([b"POST", b"post", b"G\\xffT"]), b"/v1/sales", b"a=1",
                    rng.choice([b"{}", b"", rng.randbytes(50)]))
            a, b = _outcome(sigcheck.PYTHON, *args), _outcome(native, *args)
            if a != b:
                print("differ", headers, a, b)
                sys.exit(1)
            n += 1
        print("agreed", n)
    """)
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=240,
                          check=False)
    assert done.returncode == 0 and done.stdout.strip() == "agreed 30000", (done.returncode, done.stdout,
                                                                           done.stderr[-2000:])


def test_the_choice_follows_the_environment() -> None:
    assert sigcheck.choose({"APPLIANCE_SIGCHECK": "python"})[0] is sigcheck.PYTHON
    with pytest.raises(ValueError, match="python, native or auto"):
        sigcheck.choose({"APPLIANCE_SIGCHECK": "fast"})
    auto, why = sigcheck.choose({})
    if sigcheck.NATIVE is None:
        assert auto is sigcheck.PYTHON and "not built" in why
        with pytest.raises(ValueError, match="not built"):
            sigcheck.choose({"APPLIANCE_SIGCHECK": "native"})
    else:
        assert auto is sigcheck.NATIVE and sigcheck.choose({"APPLIANCE_SIGCHECK": "native"})[0] is sigcheck.NATIVE


def test_without_the_extension_the_python_check_runs() -> None:
    """A box where the extension was not built (here: its import blocked) runs the Python
    check and says why."""
    script = textwrap.dedent("""
        import sys
        sys.modules["appliance.protocol._sigcheck"] = None  # (an import of it raises ImportError)
        from appliance.protocol import sigcheck
        check, why = sigcheck.choose({})
        print(sigcheck.NATIVE, check.name, why)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.startswith("None python the native check is not built ("), done.stdout


def test_a_wrong_choice_in_the_environment_stops_the_start_with_a_clear_error(monkeypatch) -> None:
    from appliance.config import ConfigError
    from appliance.services.keyring import KeyRing

    monkeypatch.setenv("APPLIANCE_SIGCHECK", "fast")
    with pytest.raises(ConfigError, match="environment: APPLIANCE_SIGCHECK must be python, native or auto"):
        KeyRing(idp.new_private_key())
    monkeypatch.setenv("APPLIANCE_SIGCHECK", "python")
    assert KeyRing(idp.new_private_key()).check is sigcheck.PYTHON
