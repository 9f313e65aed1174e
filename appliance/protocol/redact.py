"""Credentials out of URLs before they are shown or logged (sans-I/O).

A proxy is often configured as ``http://user:password@proxy:3128/``. Everything that shows
or logs a URL (the homepage, ``/api/status``, ``/health``, the log, ``config show``, error
messages) passes it through :func:`redact_url` first; :func:`redact_text` does the same
for every URL inside a line of text (the log formatter applies it to each line).
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["MASK", "redact_text", "redact_url"]

MASK: Final = "***"
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
