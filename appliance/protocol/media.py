"""Media on port 8002, sans-I/O: manifest entries, HTTP ranges and validators, the rate limit.

- :func:`parse_entry` checks one entry of the replica's media manifest
  (``{key, url, sha256, size, content_type}``, optionally ``private``).
- :func:`parse_range` reads a ``Range`` header (RFC 9110 §14.2) against a file's size:
  one range is served as 206, anything else as the whole file (a server may ignore Range),
  a range past the end is 416.
- :func:`etag_matches` is the ``If-None-Match`` comparison (weak, RFC 9110 §13.1.2).
- :class:`RateLimit` is a token bucket over all downloads: it says how long to wait.

Exceptions: :class:`MediaEntryError` (ValueError) for a manifest entry the box cannot use;
the message names the field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

import attrs

__all__ = ["ByteRange", "MediaEntry", "MediaEntryError", "RateLimit", "Unsatisfiable", "etag_matches", "parse_entry",
           "parse_range"]

# A catalog key is a path-like name chosen by the platform (``products/SKU-000001.jpg``).
# It is only ever a lookup key, never a file name, but one this long is not the platform's.
KEY_MAX_CHARS: Final = 512
_SHA256: Final = re.compile(r"[0-9a-f]{64}")
# A Range header longer than this is not a single range from a video player.
RANGE_MAX_CHARS: Final = 200
_ONE_RANGE: Final = re.compile(r"bytes=(\d*)-(\d*)")


class MediaEntryError(ValueError):
    """A media manifest entry that cannot be used (the message names the field)."""


@attrs.frozen(kw_only=True)
class MediaEntry:
    key: str
    url: str
    sha256: str  # lowercase hex; also the cached file's name and the ETag served
    size: int
    content_type: str
    private: bool = False  # an unreleased promotion: never served without a credential

    @property
    def etag(self) -> str:
        return f'"{self.sha256}"'


def parse_entry(key: str, data: Mapping[str, Any]) -> MediaEntry:
    """One manifest row as an entry, or :class:`MediaEntryError`."""
    if not key or len(key) > KEY_MAX_CHARS:
        raise MediaEntryError(f"key: 1 to {KEY_MAX_CHARS} characters, got {len(key)}")
    url = data.get("url")
    if not isinstance(url, str) or not url.startswith("https://"):
        raise MediaEntryError(f"url: an https:// URL is needed, got {url!r}")
    digest = data.get("sha256")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest.lower()):
        raise MediaEntryError(f"sha256: 64 hex digits are needed, got {digest!r}")
    size = data.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise MediaEntryError(f"size: a whole number of bytes is needed, got {size!r}")
    ctype = data.get("content_type", "application/octet-stream")
    if not isinstance(ctype, str) or not ctype or not ctype.isascii() or any(c in ctype for c in "\r\n"):
        raise MediaEntryError(f"content_type: a media type is needed, got {ctype!r}")
    private = data.get("private", False)
    if not isinstance(private, bool):
        raise MediaEntryError(f"private: true or false, got {private!r}")
    return MediaEntry(key=key, url=url, sha256=digest.lower(), size=size, content_type=ctype, private=private)


@attrs.frozen
class ByteRange:
    """Bytes ``start`` to ``end`` inclusive, as in ``Content-Range``."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


@attrs.frozen
class Unsatisfiable:
    """A well-formed range that starts past the end: 416 with ``Content-Range: bytes */size``."""

    size: int

    def content_range(self) -> str:
        return f"bytes */{self.size}"


def parse_range(header: str | None, size: int) -> ByteRange | Unsatisfiable | None:
    """What to send for ``Range: header`` on a file of ``size`` bytes; None = the whole file.

    Only one ``bytes=`` range is honoured: a list of ranges, another unit or a malformed
    header is ignored (RFC 9110 §14.2 lets a server ignore Range), so the answer is 200.
    """
    if header is None or len(header) > RANGE_MAX_CHARS:
        return None
    match = _ONE_RANGE.fullmatch(header.strip().replace(" ", ""))
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if not first and not last:
        return None
    if not first:  # a suffix: the last N bytes
        suffix = int(last)
        if suffix == 0:
            return Unsatisfiable(size)
        if size == 0:
            return Unsatisfiable(size)
        return ByteRange(max(0, size - suffix), size - 1)
    start = int(first)
    if last and int(last) < start:
        return None  # invalid: ignored
    if start >= size:
        return Unsatisfiable(size)
    end = min(int(last), size - 1) if last else size - 1
    return ByteRange(start, end)


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """True if ``If-None-Match`` names ``etag`` (weak comparison) or is ``*``."""
    if if_none_match is None:
        return False
    if if_none_match.strip() == "*":
        return True
    wanted = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == wanted for tag in if_none_match.split(","))


class RateLimit:
    """A token bucket shared by every download: ``rate`` bytes/s, bursts of ``burst`` bytes.

    ``rate`` 0 means no limit. :meth:`take` counts bytes already received and returns how
    long to wait before reading more, so the average stays at ``rate`` whatever the number
    of downloads.
    """

    def __init__(self, *, rate: int, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._at = now

    def take(self, nbytes: int, now: float) -> float:
        if self.rate <= 0:
            return 0.0
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= nbytes
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate
