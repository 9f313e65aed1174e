"""An answer's bytes (appliance/protocol/http_answer.py), read back by h11's client side:
any answer an app can give, in any split of its body, reads back as the same status,
headers and body, framed as the module says; a header that would inject, a bad
Content-Length, and a body beyond or short of its length are refused."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.protocol.http_answer import Answer, AnswerError, bare_answer

_NAMES = st.sampled_from([b"content-type", b"location", b"x-thing", b"Cache-Control", b"etag"])
_VALUES = st.binary(max_size=30).map(lambda b: bytes(c for c in b if c > 0x20 and c != 0x7f) or b"v")
_HEADERS = st.lists(st.tuples(_NAMES, _VALUES), max_size=5)
_STATUSES = st.sampled_from([200, 201, 204, 301, 304, 400, 404, 409, 500, 503])


def read_back(wire: bytes, method: str, http10: bool) -> tuple[h11.Response, bytes, bool]:
    """(the response, its body, whether the connection must close after it), as h11 reads it."""
    client = h11.Connection(h11.CLIENT)
    # h11 sends only HTTP/1.1: an HTTP/1.0 client is one that will not keep the connection.
    client.send(h11.Request(method=method, target="/", headers=[("host", "x"), *([("connection", "close")]
                                                                                if http10 else [])]))
    client.send(h11.EndOfMessage())
    client.receive_data(wire)
    response, body = None, b""
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(b"")  # the server closed: the end of a close-delimited body
            continue
        if isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
    assert response is not None
    assert not client.trailing_data[0], "bytes after the answer's end"
    return response, body, client.their_state is h11.MUST_CLOSE or client.our_state is h11.MUST_CLOSE


@given(status=_STATUSES, headers=_HEADERS, body=st.binary(max_size=200), cuts=st.lists(st.integers(0, 200)),
       sized=st.booleans(), method=st.sampled_from(["GET", "HEAD", "POST"]), http10=st.booleans(),
       close=st.booleans())
def test_any_answer_reads_back_the_same_through_h11(status: int, headers: list[tuple[bytes, bytes]], body: bytes,
                                                    cuts: list[int], sized: bool, method: str, http10: bool,
                                                    close: bool) -> None:
    given_headers = [*headers, *([(b"content-length", str(len(body)).encode())] if sized else [])]
    answer = Answer(status, given_headers, method=method, http10=http10, close=close)
    points = sorted({min(c, len(body)) for c in cuts})
    pieces = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    wire = b"".join(answer.write(piece, more=n < len(pieces) - 1) for n, piece in enumerate(pieces))
    assert answer.done
    response, got, must_close = read_back(wire, method, http10)
    assert response.status_code == status
    no_body = method == "HEAD" or status in (204, 304)
    assert got == (b"" if no_body else body)
    sent = [(n.lower(), v) for n, v in response.headers if n not in (b"transfer-encoding", b"connection")]
    assert [(n.lower(), v) for n, v in headers] == [h for h in sent if h[0] != b"content-length"]
    assert must_close == (close or http10 or answer.close)
    assert ((b"connection", b"close") in list(response.headers)) == answer.close  # said when it closes
    assert answer.close == (close or (http10 and not no_body and not sized and len(pieces) > 1))


@pytest.mark.parametrize("header", [
    (b"x-evil", b"a\r\nset-cookie: x=1"), (b"x-evil", b"a\nb"), (b"x-evil", b"a\x00b"), (b"bad name", b"v"),
    (b"content-length", b"12a"), (b"content-length", b"-1"),
])
def test_a_header_that_would_inject_or_a_bad_length_is_refused(header: tuple[bytes, bytes]) -> None:
    with pytest.raises(AnswerError):
        Answer(200, [header], method="GET", http10=False, close=False)


def test_a_body_beyond_or_short_of_its_length_is_refused_and_ends_the_answer() -> None:
    longer = Answer(200, [(b"content-length", b"3")], method="GET", http10=False, close=False)
    with pytest.raises(AnswerError):
        longer.write(b"four", more=True)
    assert longer.done
    shorter = Answer(200, [(b"content-length", b"3")], method="GET", http10=False, close=False)
    shorter.write(b"ab", more=True)
    with pytest.raises(AnswerError):
        shorter.write(b"", more=False)


def test_the_server_s_own_answer_is_empty_and_closes() -> None:
    response, body, must_close = read_back(bare_answer(431, [(b"server", b"x")]), "GET", http10=False)
    assert (response.status_code, body, must_close) == (431, b"", True)
