"""A change signal: one side says "something changed", any number of tasks wait for it.

Waiters remember the version they last saw, so a change that happens between two waits
is never missed (unlike a bare ``trio.Event`` that must be replaced).
"""

from __future__ import annotations

import trio

__all__ = ["ChangeSignal", "Requests"]


class ChangeSignal:
    def __init__(self) -> None:
        self.version = 0
        self._event = trio.Event()

    def notify(self) -> None:
        self.version += 1
        self._event.set()
        self._event = trio.Event()

    async def wait(self, seen: int) -> int:
        """Return the current version once it is newer than ``seen``."""
        while self.version <= seen:
            await self._event.wait()
        return self.version


class Requests:
    """Things asked for by key (a device's id), each held once until taken: asking twice
    before the taker runs is one request. ``changes`` wakes the taker."""

    def __init__(self) -> None:
        self.changes = ChangeSignal()
        self._asked: dict[str, None] = {}  # insertion order: first asked, first taken

    def ask(self, key: str) -> None:
        self._asked[key] = None
        self.changes.notify()

    def take(self) -> list[str]:
        asked, self._asked = list(self._asked), {}
        return asked
