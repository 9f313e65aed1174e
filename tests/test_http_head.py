"""The plain request head (appliance/protocol/http_head.py) against h11 on the same bytes:
whatever it reads, h11 reads the same (method, target, version, headers, the body's length,
where the next request starts); whatever it leaves, h11 parses or refuses as before. The
serving loop's reading of a plain head's body is checked against h11's in
tests/test_h11_serving.py."""

from __future__ import annotations

import h11
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from appliance.protocol.http_head import PlainHead, plain_head

LIMIT = 16 * 1024


def _mostly(good: list[bytes], bad: list[bytes]) -> st.SearchStrategy[bytes]:
    """One of ``good`` 29 times in 30, else one of ``bad``."""
    return st.integers(0, 29).flatmap(lambda n: st.sampled_from(good if n else bad))


_methods = _mostly([b"GET", b"HEAD", b"OPTIONS", b"get", b"M-SEARCH", b"POST", b"PUT", b"PATCH", b"DELETE"],
                   [b"CONNECT", b"G\xc3T", b"", b"G T"])
_targets = _mostly([b"/", b"/v1/products/SKU-000001", b"/a?b=c&d", b"*", b"/%41"], [b"/a b", b"/\x7f", b""])
_versions = _mostly([b"HTTP/1.1"], [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 ", b"http/1.1", b"HTTP/1"])
_names = _mostly([b"Authorization", b"Signature-Input", b"Signature", b"Content-Digest", b"Connection", b"Origin",
                  b"X-A", b"x_b"],
                 [b"Host", b"HOST", b"Content-Length", b"Transfer-Encoding", b"Expect", b"Upgrade", b"Bad Name", b"",
                  b"X:Y", b"\xe9"])
_value_bytes = _mostly([b"a", b"Z", b"0", b" ", b"\t", b":", b"=", b'"', b"chub=:", b"127.0.0.1", b"close", b"~"],
                       [b"\xa0", b"\xe9", b"\x00", b"\x01", b"\x7f", b"\r", b"\n", b"\x0b", b"\x0c"])
_values = st.lists(_value_bytes, max_size=8).map(b"".join)
_seps = _mostly([b": ", b":", b":\t", b": \t "], [b" : ", b" :"])
_ends = _mostly([b"\r\n"], [b"\n", b"\r", b"\r\r\n"])
_lines = st.tuples(_names, _seps, _values, _ends).map(b"".join)
# Content-Length values: plain numbers, and what h11 reads otherwise or refuses (a sign,
# blanks inside, leading zeros, a comma list, too many digits, not ASCII digits).
_lengths = _mostly([b"0", b"1", b"2", b"5", b"12", b"40"],
                   [b"+5", b"-1", b"5 5", b"05", b"00", b"5,5", b"5, 5", b"5,6", b"", b"0x5", b"\xd9\xa3",
                    b"9" * 16, b"1" * 21, b"5\x00"])
_length_lines = st.tuples(st.sampled_from([b"Content-Length", b"content-length", b"CONTENT-LENGTH"]), _seps,
                          _lengths, _mostly([b"", b" ", b"\t"], [b"\x0b"]), _ends).map(b"".join)
_folds = _mostly([b""], [b" folded\r\n", b"\tfolded\r\n", b" \r\n"])


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    """Request heads near the plain form: many plain, many off by one thing or a few."""
    line = draw(_methods) + b" " + draw(_targets) + b" " + draw(_versions) + draw(_ends)
    fields = draw(st.lists(st.tuples(_lines, _folds).map(b"".join), max_size=6))
    if draw(_mostly([b"host"], [b"none"])) == b"host":
        fields.insert(draw(st.integers(0, len(fields))), draw(st.sampled_from([b"Host", b"host"])) + b": 127.0.0.1\r\n")
    # No Content-Length (no body) half the time, one most of the rest, sometimes two.
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 1, 2]))):
        fields.insert(draw(st.integers(0, len(fields))), draw(_length_lines))
    head = draw(_mostly([b""], [b"\r\n", b"\n", b" "])) + line + b"".join(fields) + draw(_ends)
    if draw(st.integers(0, 9)) == 0:
        head = head[:draw(st.integers(-5, len(head)))]
    # After the head: a body (whole, short, or longer than announced: the next request's
    # bytes), a pipelined request, or nothing.
    return head + draw(st.sampled_from([b"", b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /par", b"body",
                                        b"{}", b'{"kind":"print","body":{}}GET /next HTTP/1.1\r\nHost: x\r\n\r\n',
                                        b"hello" * 8]))


def h11_reads(data: bytes, length: int = 0) -> tuple[object, ...] | None:
    """What h11 makes of ``data`` as a server: the request, its body and the bytes after it;
    None if h11 wants more of the head, refuses it, or finds a protocol switch. A body not all
    in ``data`` is fed the NUL bytes that make it ``length`` long, once: a body h11 frames
    longer than that is not ended (None), a shorter one ends early (the NULs follow it)."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=LIMIT)
    conn.receive_data(data)
    body, fed = b"", False
    try:
        request = conn.next_event()
        if not isinstance(request, h11.Request):
            return None
        while True:
            end = conn.next_event()
            if isinstance(end, h11.Data):
                body += end.data
            elif end is h11.NEED_DATA and not fed and length > len(body):
                conn.receive_data(b"\0" * (length - len(body)))
                fed = True
            else:
                break
    except h11.RemoteProtocolError:
        return None
    # (MUST_CLOSE: a "Connection: close" request, which the serving loop honours itself.)
    if not isinstance(end, h11.EndOfMessage) or conn.their_state not in (h11.DONE, h11.MUST_CLOSE):
        return None
    headers = [(name, value) for _, name, value in request.headers._full_items]  # type: ignore[attr-defined]
    return request.method, request.target, request.http_version, headers, body, conn.trailing_data[0]


def check_against_h11(data: bytes) -> PlainHead | None:
    head = plain_head(data, LIMIT)
    if head is not None:
        end = head.end + head.length
        body = data[head.end:end].ljust(head.length, b"\0")
        assert h11_reads(data, head.length) == (head.method, head.target, b"1.1", head.headers, body, data[end:]), data
    return head


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=heads())
@example(data=b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
@example(data=b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
@example(data=b"GET / HTTP/1.1\r\nHost: a\r\nX: \xa0\r\n\r\n")  # obs-text: h11's
@example(data=b"GET / HTTP/1.1\nHost: a\n\n")  # bare LF: h11's
@example(data=b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n folded\r\n\r\n")  # a folded line: h11's
@example(data=b"POST /c HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}GET / HTTP/1.1\r\nHost: a\r\n\r\n")
@example(data=b"POST /c HTTP/1.1\r\nHost: a\r\nContent-Length: 40\r\n\r\n{}")  # the body's rest to come
@example(data=b"POST /c HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\nGET / HTTP/1.1\r\n")
@example(data=b"POST /c HTTP/1.1\r\nHost: a\r\n\r\n{}")  # no Content-Length: no body, as h11 reads it
def test_a_plain_head_is_what_h11_reads_from_the_same_bytes(data: bytes) -> None:
    check_against_h11(data)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_any_bytes_give_a_plain_head_only_if_h11_reads_the_same(data: bytes) -> None:
    check_against_h11(data)
    check_against_h11(b"GET / HTTP/1.1\r\nHost: a\r\n" + data)


def test_the_requests_devices_and_tills_send_are_plain() -> None:
    command = (b"POST /v1/devices/kds-1/commands HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer t0k\r\n"
               b"Content-Type: application/json\r\nContent-Length: 26\r\n\r\n"
               b'{"kind":"print","body":{}}')
    for data in (command, command[:-3], command + command):
        head = check_against_h11(data)
        assert head is not None and head.length == 26 and head.end == len(command) - 26
    signed = (b"GET /v1/products/SKU-000001 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
              b"Content-Digest: sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:\r\n"
              b'Signature-Input: chub=("@method" "@path" "@query" "content-digest");created=1764500000;'
              b'nonce="0123456789abcdef0123456789abcdef";keyid="pos-1";alg="hmac-sha256"\r\n'
              b"Signature: chub=:K2qGT5srn2OGbOIDzZK0OV+kCo0xVeXHQbG4J2Gmz8A=:\r\n\r\n")
    bearer = b"GET /v1/stock/SKU-1?x=1 HTTP/1.1\r\nHost: box.local:8000\r\nAuthorization: Bearer t0k\r\n\r\n"
    for data in (signed, bearer, bearer + signed):
        head = check_against_h11(data)
        assert head is not None and head.headers[0][0] == b"host"
    assert check_against_h11(bearer + signed) == plain_head(bearer, LIMIT)


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: a\r\n",  # not ended yet
    b"GET / HTTP/1.1\r\n\r\n",  # no Host: h11 answers 400
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",  # two: h11 answers 400
    b"GET / HTTP/1.0\r\n\r\n",  # HTTP/1.0: h11's
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",  # chunks: h11's
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n",  # an interim answer
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +2\r\n\r\nok",  # a sign
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0 2\r\n\r\nok",  # a blank inside
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 02\r\n\r\nok",  # a leading zero
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",  # twice
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2, 2\r\n\r\nok",  # a list
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2,3\r\n\r\nok",  # h11 refuses it
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1234567890123456\r\n\r\n",  # 16 digits
    b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * LIMIT + b"\r\n\r\n",  # over the limit: h11's
])
def test_what_is_not_plain_is_left_to_h11(data: bytes) -> None:
    assert plain_head(data, LIMIT) is None


# Heads built to make a backtracking pattern try every way to split their blanks (empty
# values between blanks, blank runs, words and blanks), each ended by a byte that fails the
# match at the last moment. A pattern that backtracks takes minutes to years on any of them;
# one pass takes microseconds.
_HOSTILE = [
    b"GET / HTTP/1.1\r\n" + b"a:  \r\n" * 2000 + b"\x01\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"a: \t \r\n" * 1500 + b"\r\r\n",
    b"GET / HTTP/1.1\r\nHost: " + b" " * (LIMIT - 40) + b"\x01\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: " + b"a " * (LIMIT // 2 - 40) + b"\x7f\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n" + b"x: a \t b\r\n" * 1000 + b"y:" + b" " * 4000,  # never ended
    b"GET /" + b"a" * (LIMIT - 40) + b" HTTP/1.1 \r\n\r\n",
    # Content-Length values built to be read slowly: a number of the whole head's size, one
    # with blanks between its digits, a list, the header again and again; the body's length
    # is read from at most 15 digits, never from the rest.
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: " + b"9" * (LIMIT - 60) + b"\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: " + b"1 " * (LIMIT // 2 - 40) + b"\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: " + b"5," * (LIMIT // 2 - 40) + b"\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\n" + b"Content-Length: 5\r\n" * (LIMIT // 20) + b"\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: " + b"0" * (LIMIT - 60) + b"1\r\n\r\n",
]


def test_a_hostile_head_is_read_in_one_pass() -> None:
    """Each hostile head is left to h11 (None) in a child process that must finish within
    a minute: the loop that serves every device must never be held by one request's head.
    (A hang detector with a margin of many orders of magnitude, not a speed target.)"""
    import subprocess
    import sys

    script = ("import sys; from appliance.protocol.http_head import plain_head\n"
              "heads = eval(sys.stdin.read())\n"
              f"print(sum(plain_head(h, {LIMIT}) is None for h in heads))\n")
    done = subprocess.run([sys.executable, "-c", script], input=repr(_HOSTILE), capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == str(len(_HOSTILE))
