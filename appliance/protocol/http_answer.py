"""An HTTP/1.1 answer's bytes, sans I/O: the head as the app gave it plus the framing, and
the body framed by Content-Length, chunks, or the connection's close (RFC 9112 §6).

The store API's own HTTP loop (``appliance/services/h11_serving.py``) writes its answers
with this rather than through h11's send side, whose event objects, header normalisation
and state machine cost ~35 µs an answer here (h11 still parses every request). What h11
checked on the way out is checked here too: header names are tokens and values carry no
CR, LF or NUL (no header injection, whatever the app puts in a value), a Content-Length
is one decimal number, and the body is exactly as long as it says.

Framing, decided at the first body message: the app's Content-Length if it gave one; else,
when that first message is the whole body, a Content-Length of its size; else chunks
(``Transfer-Encoding: chunked``), or for an HTTP/1.0 client the connection's close. An
app's own Transfer-Encoding is dropped (the framing is ours). HEAD answers and 1xx, 204
and 304 answers carry no body bytes, whatever the app sends.

Errors: :class:`AnswerError`, the app's answer cannot be sent as given (nothing of it was
produced if it is raised by the constructor; a body beyond or short of its Content-Length
is raised by :meth:`Answer.write`, and the connection must then end).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

__all__ = ["Answer", "AnswerError", "bare_answer"]

_TOKEN: Final = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_BAD_IN_VALUE: Final = re.compile(rb"[\x00\r\n]")
_CRLF: Final = b"\r\n"


# Header lines already checked, by (name, value) as the app gave them: most of an answer's
# headers are the same on every answer (content type, the security headers, the server's),
# and checking each by regex was most of an answer's cost. Cleared when full.
_CHECKED: dict[tuple[bytes, bytes], bytes] = {}
_CHECKED_KEPT: Final = 256


class AnswerError(Exception):
    """The app's answer cannot be sent as it is."""


class Answer:
    """One answer to one request: :meth:`write` each body message in turn; the first also
    gives the head. ``close``: the connection ends after this answer (it says so);
    ``method`` and ``http10`` are the request's."""

    def __init__(self, status: int, headers: Iterable[tuple[bytes, bytes]], *, method: str, http10: bool,
                 close: bool, extra: Iterable[tuple[bytes, bytes]] = ()) -> None:
        if not 100 <= status <= 999:
            raise AnswerError(f"status {status} is not a 3-digit HTTP status")
        self.no_body = method == "HEAD" or status < 200 or status in (204, 304)
        self.http10 = http10
        self.close = close
        self.length: int | None = None
        lines = [b"HTTP/1.1 %d \r\n" % status]
        for raw_name, raw_value in (*headers, *extra):
            given = (bytes(raw_name), bytes(raw_value))
            line = _CHECKED.get(given)
            if line is not None:
                lines.append(line)
                continue
            name, value = given[0].strip(), given[1].strip()
            if _TOKEN.fullmatch(name) is None:
                raise AnswerError(f"header name {name[:40]!r} is not an HTTP token")
            if _BAD_IN_VALUE.search(value) is not None:
                raise AnswerError(f"header {name.decode('ascii')} has CR, LF or NUL in its value")
            lower = name.lower()
            if lower == b"content-length":
                if not value.isdigit() or len(value) > 18 or (self.length is not None and int(value) != self.length):
                    raise AnswerError(f"Content-Length {value[:40]!r} is not one decimal number")
                if self.length is not None:
                    continue  # the same value twice: written once
                self.length = int(value)
            elif lower == b"transfer-encoding":
                continue
            elif lower == b"connection":
                self.close = self.close or b"close" in value.lower()
                continue  # ours is written below if the connection closes
            line = name + b": " + value + _CRLF
            lines.append(line)
            if lower != b"content-length":  # an ordinary header: the same line next time
                if len(_CHECKED) >= _CHECKED_KEPT:
                    _CHECKED.clear()
                _CHECKED[given] = line
        self._lines = lines
        self._sent = 0
        self._chunked = False
        self.started = False  # the head has been written
        self.done = False  # the whole answer has been written

    def write(self, body: bytes, more: bool) -> bytes:
        """The bytes for one body message (with the head before them, the first time)."""
        if self.done:
            raise AnswerError("the answer is already complete")
        out = b""
        if not self.started:
            out = self._head(body, more)
            self.started = True
        if self.no_body:
            body = b""
        elif self.length is not None:
            self._sent += len(body)
            if self._sent > self.length or (not more and self._sent < self.length):
                self.done = True  # no more of it may be written: the connection must end
                raise AnswerError(f"the body is {'longer' if more else 'other'} than its Content-Length "
                                  f"({self.length} bytes)")
        elif self._chunked:
            body = (b"%x\r\n" % len(body) + body + _CRLF if body else b"") + (b"" if more else b"0\r\n\r\n")
        if not more:
            self.done = True
        return out + body

    def _head(self, body: bytes, more: bool) -> bytes:
        lines = self._lines
        if self.length is None and not self.no_body:
            if not more:
                self.length = len(body)
                lines.append(b"content-length: %d\r\n" % self.length)
            elif self.http10:
                self.close = True  # the body ends with the connection
            else:
                self._chunked = True
                lines.append(b"transfer-encoding: chunked\r\n")
        if self.close:
            lines.append(b"connection: close\r\n")
        return b"".join(lines) + _CRLF


def bare_answer(status: int, extra: Iterable[tuple[bytes, bytes]] = ()) -> bytes:
    """A whole answer with no body that closes the connection (the server's own: 400, 431, 500)."""
    answer = Answer(status, [(b"content-length", b"0")], method="GET", http10=False, close=True, extra=extra)
    return answer.write(b"", more=False)
