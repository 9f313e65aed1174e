"""A change signal: one side says "something changed", any number of tasks wait for it.

Waiters remember the version they last saw, so a change that happens between two waits
is never missed (unlike a bare ``trio.Event`` that must be replaced).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import trio

from appliance.storage.outbox import Enqueued

__all__ = ["ChangeSignal", "OutboxChanges", "Requests"]


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


class OutboxChanges(ChangeSignal):
    """Commands were enqueued to devices' outboxes (``runtime.outbox_changes``).

    :meth:`notify` says only that: the dispatcher then reads the outbox for the new rows.
    :meth:`hand` gives it the committed commands themselves, which it passes to their
    devices' links without that read (one read of every device's last seq, and one of
    the link's new rows, per enqueue: docs/architecture.md §7, "The way of one command").
    Call either only once the transaction that stored the commands has committed: a
    command handed over may be sent at once.
    """

    def __init__(self) -> None:
        super().__init__()
        self._taker: Callable[[Sequence[Enqueued]], None] | None = None

    def hand(self, enqueued: Sequence[Enqueued]) -> None:
        """The commands of ``enqueued`` (repeats included: they carry none) to the taker;
        with no taker (no dispatcher running), a :meth:`notify`."""
        if self._taker is None:
            self.notify()
        else:
            self._taker(enqueued)

    def take_with(self, taker: Callable[[Sequence[Enqueued]], None]) -> Callable[[], None]:
        """Give what :meth:`hand` is given to ``taker`` (the dispatcher, while it runs; it
        must not block or raise); returns the function that stops it."""
        self._taker = taker

        def stop() -> None:
            if self._taker is taker:
                self._taker = None

        return stop
