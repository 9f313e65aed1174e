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
- exactly one Host (HTTP/1.1 requires it), and no body: no Content-Length,
  Transfer-Encoding, Expect or Upgrade, and not CONNECT;
- the whole head within ``limit`` bytes, ended by an empty line, all in ``data``.

Anything else (an incomplete head too: a client that sends its head in pieces) gives None,
and the caller hands the bytes to h11, which parses the request or answers the error as it
always has. So this never refuses a request, and a hostile one meets h11's checks.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

__all__ = ["PlainHead", "plain_head"]

# Every quantifier possessive and each header line an atomic group: at every byte only one
# way goes on, so a match is one pass over the bytes whatever they are. With plain
# quantifiers, blanks that either ``[ \t]*`` around an empty value could take made a head of
# twenty ``a:  `` lines ending in a bad byte backtrack for minutes on the one event loop.
_TOKEN: Final = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]++"
_VALUE: Final = rb"(?:[\x21-\x7e]++(?:[ \t]++[\x21-\x7e]++)*+)?+"
_HEAD: Final = re.compile(rb"(%s) ([\x21-\x7e]++) HTTP/1\.1\r\n((?>%s:[ \t]*+%s[ \t]*+\r\n)*+)\r\n"
                          % (_TOKEN, _TOKEN, _VALUE))
_FIELD: Final = re.compile(rb"(%s):[ \t]*+(%s)[ \t]*+\r\n" % (_TOKEN, _VALUE))
# Headers that give a request a body or ask to leave HTTP/1.1: such a request is h11's.
_NOT_PLAIN: Final = frozenset({b"content-length", b"transfer-encoding", b"expect", b"upgrade"})


class PlainHead(NamedTuple):
    """A request head as h11 would give it (``http_version`` is always ``b"1.1"``): the
    method as sent, the target, the (lower-cased name, value) pairs; ``end`` is where the
    head ends in the bytes given (a pipelined request's bytes follow)."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    end: int


def plain_head(data: bytes, limit: int) -> PlainHead | None:
    """The head at the start of ``data`` if it is plain and complete within ``limit`` bytes,
    else None (for h11 to parse)."""
    match = _HEAD.match(data)
    if match is None or match.end() > limit:
        return None
    method, target, block = match.groups()
    if method == b"CONNECT":
        return None
    headers = []
    hosts = 0
    for raw_name, value in _FIELD.findall(block):
        name = raw_name.lower()
        if name in _NOT_PLAIN:
            return None
        if name == b"host":
            hosts += 1
        headers.append((name, value))
    if hosts != 1:
        return None
    return PlainHead(method, target, headers, match.end())
