"""The process-wide budget of request-body bytes in memory (see ``services.guard``)."""

from __future__ import annotations

import trio

__all__ = ["BodyBudget"]


class BodyBudget:
    """At most ``capacity`` bytes of request bodies handled at once, process-wide.

    :meth:`acquire` waits for room; a request bigger than the whole budget waits for all of
    it. Cancellation while waiting takes nothing; the caller gives the room back with
    :meth:`release`, however the request ended."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be 1 or more, got {capacity}")
        self.capacity = capacity
        self.in_use = 0
        self._lot = trio.lowlevel.ParkingLot()

    def try_acquire(self, size: int) -> int:
        """Room for ``size`` bytes (at most the whole budget) if there is some now, without
        waiting: returns what is held, or 0 (nothing taken)."""
        size = max(1, min(size, self.capacity))
        if self.in_use + size > self.capacity:
            return 0
        self.in_use += size
        return size

    async def acquire(self, size: int) -> int:
        """Wait for room for ``size`` bytes (at most the whole budget); returns what is held."""
        size = max(1, min(size, self.capacity))
        while self.in_use + size > self.capacity:
            await self._lot.park()
        self.in_use += size
        return size

    def release(self, size: int) -> None:
        self.in_use -= size
        self._lot.unpark_all()
