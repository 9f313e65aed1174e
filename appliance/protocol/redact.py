"""Redaction: the one function that keeps secrets on the box, sans I/O.

Everything that leaves the box or a technician may copy (shipped log batches, the
diagnostics bundle, the live log tail) goes through :meth:`Redactor.redact`, and so does
every record before it is written to the log ring. It removes:

- every *known* secret, verbatim (the list is assembled in one place,
  ``appliance.storage.known_secrets``: admin token, platform token, Service Bus SAS keys,
  the log intake key, the store secret, proxy passwords, device keys), also in its
  URL-encoded form (a proxy password inside a URL);
- secrets by *shape*, for values this box was never told about: ``Bearer ...``,
  ``SharedAccessKey=...``, ``sig=...``, the credentials of ``scheme://user:password@host``
  (:func:`redact_text`, which the stderr log formatter applies to every line too),
  JSON or ``key=value`` pairs whose key names a secret (``"token": "..."``), and raw
  32-byte keys in hex or base64 (device keys look like that).

:func:`redact_url` masks the credentials of one URL before it is shown (the homepage,
``config show``, error messages).

Known secrets shorter than :data:`MIN_SECRET_LEN` are not replaced verbatim (a three-letter
"password" would shred every line); the shape rules still catch them as values.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Final

__all__ = ["MASK", "MIN_SECRET_LEN", "Redactor", "redact_text", "redact_url"]

MASK: Final = "***"
MIN_SECRET_LEN: Final = 6

_WORDS: Final = ("token", "password", "passwd", "secret", "sas_key", "api_key", "apikey", "private_key",
                  "device_key", "authorization")
_KEY_WORDS: Final = "(?:" + "|".join(_WORDS) + ")"
# Each shape with the lower-case words one of which must be in the text for it to apply:
# checking for a word is a fast scan in C, and most records have none (a record costs a
# few microseconds instead of tens; measured in benchmarks/logs.py).
_SHAPES: Final[tuple[tuple[re.Pattern[str], tuple[str, ...]], ...]] = (
    (re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/=-]+"), ("bearer",)),
    (re.compile(r"(?i)(SharedAccessKey\s*=\s*)[^;\s\"'\\]+"), ("sharedaccesskey",)),
    (re.compile(r"(?i)(\bsig=)[^&\s\"'\\]+"), ("sig=",)),
    (re.compile(r"(?i)(\"[a-z_]*" + _KEY_WORDS + r"[a-z_]*\"\s*:\s*\")(?:[^\"\\]|\\.)+(?=\")"), _WORDS),
    (re.compile(r"(?i)(\b[a-z_]*" + _KEY_WORDS + r"[a-z_]*\s*[=:]\s*)[^\s,;&\"'}\\]+"), _WORDS),
    # Raw 32-byte keys (device keys, X25519 private keys, SAS keys): 64 hex or 44 base64
    # characters. A SHA-256 digest is masked too: over-masking is the safe side.
    (re.compile(r"()(?<![0-9A-Za-z])[0-9a-fA-F]{64}(?![0-9A-Za-z])"), ()),
    (re.compile(r"()(?<![0-9A-Za-z+/])[0-9A-Za-z+/]{43}=(?![0-9A-Za-z+/=])"), ("=",)),
)


class Redactor:
    """Masks ``secrets`` (verbatim) and secret-shaped values in text.

    Immutable; build a new one when the set of secrets changes (pairing, a new device
    key). Known secrets are one compiled alternation, longest first.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if len(secret) >= MIN_SECRET_LEN:
                forms.add(secret)
                forms.add(_percent_encoded(secret))
                forms.add(json.dumps(secret, ensure_ascii=False)[1:-1])
        self.count = len(forms)
        ordered = sorted(forms, key=len, reverse=True)
        self._known = re.compile("|".join(re.escape(s) for s in ordered)) if ordered else None

    def redact(self, text: str) -> str:
        """``text`` with every known secret and secret-shaped value replaced by ``***``."""
        if self._known is not None:
            text = self._known.sub(MASK, text)
        text = redact_text(text)
        lower = text.lower()
        for shape, words in _SHAPES:
            if not words or any(word in lower for word in words):
                text = shape.sub(_keep_prefix, text)
        return text

    def redact_bytes(self, data: bytes) -> bytes:
        """:meth:`redact` for UTF-8 bytes (invalid bytes are replaced, never passed through)."""
        return self.redact(data.decode("utf-8", "replace")).encode("utf-8")


def _percent_encoded(text: str) -> str:
    """``text`` as in a URL's userinfo (RFC 3986 unreserved characters kept)."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "-._~") else
                   "".join(f"%{b:02X}" for b in c.encode()) for c in text)


def _keep_prefix(match: re.Match[str]) -> str:
    return match.group(1) + MASK


# scheme://userinfo@ — the userinfo runs to the last "@" before the next "/", space or quote,
# so a password holding "@" or ":" is hidden whole.
_USERINFO: Final = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^\s'\"<>/]*@)")


def redact_url(url: str) -> str:
    """``url`` with its userinfo replaced by ``***``: ``http://***@proxy:3128/``. A URL
    without credentials comes back unchanged. Never raises."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # The authority ends at the first "/", "?" or "#" (a password holding one of them would
    # have to be percent-encoded); within it, the userinfo ends at the last "@".
    end = min((i for i in (rest.find(c) for c in "/?#") if i != -1), default=len(rest))
    authority = rest[:end]
    at = authority.rfind("@")
    if at == -1:
        return url
    return f"{scheme}://{MASK}@{authority[at + 1:]}{rest[end:]}"


def redact_text(text: str) -> str:
    """``text`` with the credentials of every ``scheme://user:pass@host`` in it masked."""
    if "@" not in text or "://" not in text:
        return text
    return _USERINFO.sub(lambda m: f"{m.group(1)}{MASK}@", text)
