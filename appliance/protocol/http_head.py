"""A request head in the plain form clients send, read in one pass, sans I/O; the rest is h11's.

The store API's HTTP loop (``appliance/services/h11_serving.py``) parses most request heads
with h11, whose per-line work (a pattern per line for the line folding, another for the
field, a third to validate the name and the value again, five scans of the list for the
framing headers) was the largest part of what a device's three signature headers cost
over the bearer token's one (docs/store-api.md, "Speed"). :func:`plain_head` reads a head
only when it is in a strict subset of what h11 accepts, and then gives exactly what h11
would give (a differential test runs both on any bytes):

- the request line ``METHOD SP target SP HTTP/1.1`` CRLF (a token, visible ASCII, 1.1 only);
- header lines ``name: value`` CRLF, the name a token, the value visible ASCII runs
  separated by blanks (no obs-text, no control bytes, no folded lines), blanks around it
  dropped; names lower-cased, values as sent, in order;
- exactly one Host (HTTP/1.1 requires it); no Transfer-Encoding, Expect or Upgrade, and
  not CONNECT;
- at most one Content-Length, its value plain decimal digits (no sign, blank inside, comma
  list or leading zero; at most :data:`MAX_LENGTH_DIGITS` of them): the body is that many
  bytes after the head (:attr:`PlainHead.length`; none without one, as h11 reads a request);
- the whole head within ``limit`` bytes, ended by an empty line, all in ``data`` (the body
  need not be: the caller reads it, bounded as the app asks, as h11's reader would).

Anything else (an incomplete head too: a client that sends its head in pieces) gives None,
and the caller hands the bytes to h11, which parses the request or answers the error as it
always has. So this never refuses a request, and a hostile one meets h11's checks. A
command's POST (one small JSON body) is plain: through h11 its head, body and end cost it
more than a GET's whole head (docs/store-api.md, "Speed").
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

__all__ = ["MAX_LENGTH_DIGITS", "PlainHead", "plain_head"]

_TOKEN_BYTES: Final = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# The request line: possessive quantifiers (and no blank in the target), so one pass.
_REQUEST_LINE: Final = re.compile(rb"([-!#$%&'*+.^_`|~0-9A-Za-z]++) ([\x21-\x7e]++) HTTP/1\.1")
# The bytes a plain head's header lines hold, CR LF between them aside: visible ASCII and
# blanks. Checked for the whole block at once by bytes.translate, then each line split at
# its first colon: no pattern runs over the header lines at all (two patterns run byte by
# byte cost a signed head's three signature headers 4 us in the running box, and a pattern
# with two blank runs around an empty value could backtrack for minutes on a hostile head).
_FIELD_BYTES: Final = bytes(range(0x21, 0x7F)) + b" \t"
# CONNECT asks to leave HTTP: h11's at once, without reading its header lines first.
_H11_METHODS: Final = frozenset({b"CONNECT"})
# Headers that frame a body in chunks, ask for an interim answer or ask to leave HTTP/1.1:
# such a request is h11's.
_NOT_PLAIN: Final = frozenset({b"transfer-encoding", b"expect", b"upgrade"})
# The longest Content-Length read here (a petabyte): a longer one is h11's (which takes up to
# 20 digits), and the listener refuses either long before (its body limit, 413).
MAX_LENGTH_DIGITS: Final = 15


class PlainHead(NamedTuple):
    """A request head as h11 would give it (``http_version`` is always ``b"1.1"``): the
    method as sent, the target, the (lower-cased name, value) pairs; ``end`` is where the
    head ends in the bytes given (its body's bytes, then a pipelined request's, follow);
    ``length`` is its body's (its Content-Length, 0 without one)."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    end: int
    length: int


def plain_head(data: bytes, limit: int) -> PlainHead | None:
    """The head at the start of ``data`` if it is plain and complete within ``limit`` bytes,
    else None (for h11 to parse)."""
    end = data.find(b"\r\n\r\n", 0, limit)
    if end < 0:
        return None
    line_end = data.find(b"\r\n", 0, end + 2)
    request = _REQUEST_LINE.fullmatch(data, 0, line_end)
    if request is None:
        return None
    method, target = request.groups()
    if method in _H11_METHODS:
        return None
    # The header lines, each "name:value" and CR LF: no other CR or LF, only visible ASCII
    # and blanks, the name a token (so no line starts with a blank: none is folded).
    block = data[line_end + 2:end]
    if block.replace(b"\r\n", b"").translate(None, _FIELD_BYTES):
        return None
    headers = []
    hosts = 0
    length = -1
    for line in block.split(b"\r\n") if block else ():
        raw_name, colon, value = line.partition(b":")
        if not colon or not raw_name or raw_name.translate(None, _TOKEN_BYTES):
            return None
        name = raw_name.lower()
        if name in _NOT_PLAIN:
            return None
        value = value.strip(b" \t")
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            # One decimal number as h11 reads it ("007", "5, 5" and a second header are
            # h11's too, which reads some and refuses others); bytes.isdigit is ASCII only.
            if length >= 0 or not value.isdigit() or len(value) > MAX_LENGTH_DIGITS \
                    or (value[0] == 0x30 and len(value) > 1):
                return None
            length = int(value)
        headers.append((name, value))
    if hosts != 1:
        return None
    # (tuple.__new__ as the named tuple's _make does, without its Python-level __new__.)
    return tuple.__new__(PlainHead, (method, target, headers, end + 4, max(length, 0)))
