"""How late trio's loop runs a timer: the box's own measure of loop stalls (``/metrics``).

Every task runs on trio's one thread, so a stall (a long step, a blocking call on the
loop, a collection of Python's GC, a CPU taken by others) delays everything, the device
channel's commands and the store API's answers alike (docs/architecture.md §3, "Loop
stalls"). :func:`watch_loop` sleeps :data:`TICK_S` at a time and records how much later
than asked it woke: ``loop_stalls`` counts the wake-ups later than :data:`STALL_S`,
``loop_longest_stall_seconds`` is the worst since start. One wake-up four times a second
costs nothing measurable.

:func:`hand_back_the_gil` shortens how long another thread running Python may keep the
GIL once trio's thread asks for it back (CPython's switch interval, 5 ms by default, to
:data:`SWITCH_INTERVAL_S`). Each time the loop's thread makes a system call (every send,
receive and poll) it lets the GIL go; a worker thread in pure Python (the media plan's
walk over the manifest, a parse, JSON) takes it, and the loop waits up to the interval to
get it back, again at the next call: a task step of ten calls could wait 50 ms. Measured
here (trio socket ping-pong beside a thread in a pure Python loop, load 8-9): round trip
p99 22-43 ms at 5 ms, 8-11 ms at 1 ms, the thread's own loop rate the same within noise.
"""

from __future__ import annotations

import sys
from typing import Final

import attrs
import trio

__all__ = ["STALL_S", "SWITCH_INTERVAL_S", "TICK_S", "LoopLag", "hand_back_the_gil", "watch_loop"]

# The timer's period: a stall shorter than this may fall between two ticks unseen.
TICK_S: Final = 0.25
# A wake-up this late or later counts as a stall: past what a person notices on a till.
STALL_S: Final = 0.05
# How long a thread running Python may keep the GIL once another thread asks for it.
SWITCH_INTERVAL_S: Final = 0.001


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


def hand_back_the_gil() -> None:
    """Set the process's switch interval to :data:`SWITCH_INTERVAL_S` (process-wide: for
    the appliance's own process, not a library's caller)."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)
