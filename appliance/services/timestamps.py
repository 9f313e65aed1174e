"""Times as the platform and the JSON APIs write them, and as a person reads them."""

from __future__ import annotations

from datetime import UTC, datetime

from appliance.protocol.text import Text

__all__ = ["duration", "rfc3339"]


def rfc3339(when: float) -> str:
    """Unix time as RFC 3339 in UTC with milliseconds: ``2026-11-29T18:40:00.000Z``."""
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def duration(seconds: float) -> Text:
    """A length of time in words: "12 s", "3 min", "5 h", "2 days" (a Text: "2 jours")."""
    s = max(0, int(seconds))
    if s < 120:
        return Text("{n} s", n=s)
    if s < 7200:
        return Text("{n} min", n=s // 60)
    if s < 172800:
        return Text("{n} h", n=s // 3600)
    return Text("{n} days", n=s // 86400)
