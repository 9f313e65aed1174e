"""A ``multipart/form-data`` body read as a stream, sans-I/O (RFC 7578 on RFC 2046).

A plain HTML form sends a file this way, and the homepage has no JavaScript: a firmware
bundle (a few hundred MiB) comes as one part among the form's small fields. The reader
never holds a part's content: it hands it on in the pieces it arrives in, so the caller
writes it to disk as it comes, and it can act on the fields sent before the file (the
admin token) before any of the file is read.

- :func:`boundary_of`: the boundary of a ``Content-Type`` header, or :class:`MultipartError`.
- :class:`MultipartReader`: ``receive_data(bytes)`` (``b""``: the body ended), then
  ``next_event()`` until it returns :data:`NEED_DATA`: :class:`PartStart` (the part's
  name, file name, type), :class:`PartData` (a piece of its content), :class:`PartEnd`,
  then :class:`Done` after the closing boundary.

Bounds: a part's header block (:data:`MAX_HEADER_BYTES`), the parts in a body
(:data:`MAX_PARTS`), the bytes before the first boundary (:data:`MAX_PREAMBLE_BYTES`).
Buffered at most: one received piece plus a boundary's length.

Exceptions: :class:`MultipartError` (a ``ValueError``): a body that does not follow the
format, breaks a bound, or ends before its closing boundary (a truncated upload).
"""

from __future__ import annotations

import re
from typing import Final

import attrs

__all__ = ["MAX_HEADER_BYTES", "MAX_PARTS", "NEED_DATA", "Done", "MultipartError", "MultipartReader", "PartData",
           "PartEnd", "PartStart", "boundary_of"]

# A part's headers are a Content-Disposition and perhaps a Content-Type: well under 1 KiB.
MAX_HEADER_BYTES: Final = 4096
# The homepage's forms have a handful of fields; anything with more parts is not ours.
MAX_PARTS: Final = 16
# Browsers send no preamble; RFC 2046 allows one, and a few bytes of it are tolerated.
MAX_PREAMBLE_BYTES: Final = 1024
# RFC 2046 §5.1.1: 1 to 70 characters of this set, the last not a space.
_BOUNDARY: Final = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_PARAM: Final = re.compile(r';\s*([A-Za-z0-9_*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


class MultipartError(ValueError):
    """The body is not a ``multipart/form-data`` body the box takes (the text says why)."""


@attrs.frozen(kw_only=True)
class PartStart:
    name: str
    filename: str | None = None  # None: a field, not a file
    content_type: str = ""


@attrs.frozen(kw_only=True)
class PartData:
    data: bytes


@attrs.frozen
class PartEnd:
    pass


@attrs.frozen
class Done:
    pass


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()
Event = PartStart | PartData | PartEnd | Done


def _params(value: str) -> dict[str, str]:
    """``form-data; name="a"; filename="b"`` -> {"name": "a", "filename": "b"}."""
    out: dict[str, str] = {}
    for key, raw in _PARAM.findall(";" + value.partition(";")[2]):
        text = raw.strip()
        if text.startswith('"'):
            text = re.sub(r"\\(.)", r"\1", text[1:-1])
        out[key.lower()] = text
    return out


def boundary_of(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` ``Content-Type``."""
    kind = content_type.partition(";")[0].strip().lower()
    if kind != "multipart/form-data":
        raise MultipartError(f"expected a form with a file (multipart/form-data), got {kind or 'nothing'}")
    boundary = _params(content_type).get("boundary", "")
    if not _BOUNDARY.fullmatch(boundary):
        raise MultipartError("the form's boundary is missing or not a valid one (RFC 2046: 1 to 70 characters)")
    return boundary.encode("ascii")


def _part_start(block: bytes) -> PartStart:
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MultipartError(f"a part's headers are not UTF-8: {exc}") from exc
    headers: dict[str, str] = {}
    for line in text.split("\r\n"):
        if not line:
            continue
        key, colon, value = line.partition(":")
        if not colon or not key.strip():
            raise MultipartError(f"a part's header line is not 'Name: value': {line[:80]!r}")
        headers[key.strip().lower()] = value.strip()
    disposition = headers.get("content-disposition")
    if disposition is None or disposition.partition(";")[0].strip().lower() != "form-data":
        raise MultipartError("a part has no Content-Disposition: form-data")
    params = _params(disposition)
    if "name" not in params:
        raise MultipartError("a part's Content-Disposition names no field (name=)")
    return PartStart(name=params["name"], filename=params.get("filename"),
                     content_type=headers.get("content-type", ""))


class MultipartReader:
    """The events of one ``multipart/form-data`` body, fed in any pieces."""

    def __init__(self, boundary: bytes) -> None:
        self._dash = b"--" + boundary
        self._delimiter = b"\r\n--" + boundary
        self._buf = bytearray()
        self._state = "preamble"  # preamble, after-boundary, headers, body, done
        self._ended = False
        self._parts = 0

    def receive_data(self, data: bytes) -> None:
        """More of the body; ``b""`` says it ended."""
        if self._ended and data:
            raise RuntimeError("data after the end of the body")
        if not data:
            self._ended = True
        elif self._state != "done":
            self._buf += data  # the epilogue after the closing boundary is dropped

    def next_event(self) -> Event | _NeedData:
        """The next event, :data:`NEED_DATA`, or :class:`MultipartError`."""
        event = self._step()
        if event is NEED_DATA and self._ended and self._state != "done":
            raise MultipartError("the body ended before its closing boundary (the upload was cut short)")
        return event

    def _step(self) -> Event | _NeedData:
        buf = self._buf
        if self._state == "preamble":
            at = 0 if buf.startswith(self._dash) else buf.find(self._delimiter)
            if at < 0:
                if len(buf) > MAX_PREAMBLE_BYTES + len(self._delimiter):
                    raise MultipartError("no boundary at the start of the body")
                return NEED_DATA
            if at > MAX_PREAMBLE_BYTES:
                raise MultipartError("no boundary at the start of the body")
            del buf[:at + (len(self._dash) if buf.startswith(self._dash) else len(self._delimiter))]
            self._state = "after-boundary"
        if self._state == "after-boundary":
            if len(buf) < 2:
                return NEED_DATA
            if buf[:2] == b"--":
                self._state = "done"
                buf.clear()
                return Done()
            if buf[:2] != b"\r\n":
                raise MultipartError("a boundary is followed by neither a line end nor '--'")
            del buf[:2]
            self._state = "headers"
        if self._state == "headers":
            end = buf.find(b"\r\n\r\n") if not buf.startswith(b"\r\n") else -2
            if end == -1:
                if len(buf) > MAX_HEADER_BYTES:
                    raise MultipartError(f"a part's headers are longer than {MAX_HEADER_BYTES} bytes")
                return NEED_DATA
            block, cut = (b"", 2) if end == -2 else (bytes(buf[:end]), end + 4)
            if len(block) > MAX_HEADER_BYTES:
                raise MultipartError(f"a part's headers are longer than {MAX_HEADER_BYTES} bytes")
            self._parts += 1
            if self._parts > MAX_PARTS:
                raise MultipartError(f"more than {MAX_PARTS} parts in the form")
            del buf[:cut]
            self._state = "body"
            return _part_start(block)
        if self._state == "body":
            at = buf.find(self._delimiter)
            if at == 0:
                del buf[:len(self._delimiter)]
                self._state = "after-boundary"
                return PartEnd()
            # Without the delimiter, all but its length - 1 is surely content.
            take = at if at > 0 else len(buf) - (len(self._delimiter) - 1)
            if take <= 0:
                return NEED_DATA
            data = bytes(buf[:take])
            del buf[:take]
            return PartData(data=data)
        return NEED_DATA
