"""Timestamps as the platform and the JSON APIs write them."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["rfc3339"]


def rfc3339(when: float) -> str:
    """Unix time as RFC 3339 in UTC with milliseconds: ``2026-11-29T18:40:00.000Z``."""
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
