"""How late trio's loop runs a timer: the box's own measure of loop stalls (``/metrics``).

Every task runs on trio's one thread, so a stall (a long step, a blocking call on the
loop, a collection of Python's GC, a CPU taken by others) delays everything, the device
channel's commands and the store API's answers alike (docs/architecture.md §3, "Loop
stalls"). :func:`watch_loop` sleeps :data:`TICK_S` at a time and records how much later
than asked it woke: ``loop_stalls`` counts the wake-ups later than :data:`STALL_S`,
``loop_longest_stall_seconds`` is the worst since start. One wake-up four times a second
costs nothing measurable.
"""

from __future__ import annotations

from typing import Final

import attrs
import trio

__all__ = ["STALL_S", "TICK_S", "LoopLag", "watch_loop"]

# The timer's period: a stall shorter than this may fall between two ticks unseen.
TICK_S: Final = 0.25
# A wake-up this late or later counts as a stall: past what a person notices on a till.
STALL_S: Final = 0.05


@attrs.define
class LoopLag:
    stalls: int = 0
    longest_s: float = 0.0

    def observe(self, late_s: float) -> None:
        self.longest_s = max(self.longest_s, late_s)
        if late_s >= STALL_S:
            self.stalls += 1


async def watch_loop(lag: LoopLag) -> None:
    """Until cancelled: a timer every :data:`TICK_S`, its lateness into ``lag``."""
    while True:
        due = trio.current_time() + TICK_S
        await trio.sleep_until(due)
        lag.observe(max(0.0, trio.current_time() - due))
