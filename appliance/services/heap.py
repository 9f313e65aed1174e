"""The process's heap and Python's cyclic garbage collector (docs/architecture.md §3, "Loop stalls").

CPython (3.11) collects its oldest generation, every object the process holds, whenever
the objects promoted since the last full pass exceed a quarter of it. After start-up that
heap is some 80,000 objects that live as long as the process (the modules, classes and
functions of trio, hypercorn, attrs and the appliance, the config, the apps): one full
pass over them took 50-60 ms of CPU on an x86 core, longer on a Pi's, during which no task
runs. A burst (a window of commands, a crowd of HTTP clients) promotes enough to trigger
one a few seconds later; it was the device channel's worst latency at 100 commands/s
(``scripts/bench dispatch``: a 186 ms pass under the paced commands, nothing collected).

:func:`settle` runs once the process is up: one last full collection, then
``gc.freeze()`` moves every survivor into the permanent generation, which no collection
scans again. Later objects are collected as before (the young generations, and full
passes over what was made after start, which stay small); a frozen object freed by its
reference count is freed as before. What freezing gives up: a cycle among start-up
objects that becomes garbage later is never collected (start-up objects live as long as
the process, so none is expected).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

__all__ = ["GcWatch", "settle"]


def settle() -> int:
    """Collect once more and freeze what survives; returns how many objects were frozen
    (the start-up heap). Blocking for the length of one full collection: call it once, when
    the process is up and before it serves anyone (the supervisor does, just before READY)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class GcWatch:
    """Python's collections by generation, and the longest pause of each, since installed
    (``gc.callbacks``; a few microseconds per collection): the gauges that show whether
    the collector stops the loop on this box (``/metrics``: ``gc_collections``,
    ``gc_longest_pause_seconds``)."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.longest_s = [0.0, 0.0, 0.0]
        self._started = 0.0

    def install(self) -> Callable[[], None]:
        """Start counting; returns the function that stops it."""
        gc.callbacks.append(self._callback)
        return lambda: gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation = info["generation"]
        self.collections[generation] += 1
        self.longest_s[generation] = max(self.longest_s[generation], time.perf_counter() - self._started)
