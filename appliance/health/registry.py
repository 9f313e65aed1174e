"""Where services register their health checks, and how they are all run at once.

A check function is async and returns a list of :class:`~appliance.protocol.health.Check`.
Each runs under its own deadline; one that raises or overruns becomes a ``fail`` check
saying so, so a broken check never hides the others.

Readers (the homepage, ``/health``, ``/readyz``'s report, ``appliance health``, the
heartbeat, the support channel) call :meth:`HealthRegistry.latest`: the checks run at most
once at a time and their results are reused for ``cache_s`` seconds, so 600 concurrent
homepage requests cost one run, not 600 (each run opens a connection to every listener
and, on the box, runs ``nft``). :meth:`HealthRegistry.refresh` is the admin's forced run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from appliance.protocol.health import Check, Status
from appliance.protocol.text import Text

__all__ = ["CheckFn", "HealthRegistry"]

CheckFn = Callable[[], Awaitable[list[Check]]]
log = logging.getLogger(__name__)


# Results younger than this are reused: fresh enough for a person, and a bound on the work
# any number of readers can cause.
CACHE_S: Final = 5.0


class HealthRegistry:
    def __init__(self, *, check_timeout_s: float = 5.0, cache_s: float = CACHE_S) -> None:
        self.check_timeout_s = check_timeout_s
        self.cache_s = cache_s
        self._checks: dict[str, CheckFn] = {}
        self._results: list[Check] | None = None
        self._results_at = -math.inf  # trio clock
        self._running: trio.Event | None = None
        self.runs = 0

    async def latest(self) -> list[Check]:
        """The results of a run that ended less than ``cache_s`` ago, or of the next run.

        One run at a time: callers arriving during a run wait for it. If the caller that
        started a run is cancelled, the run is cancelled with it and the next waiter starts
        another."""
        while True:
            if self._results is not None and trio.current_time() - self._results_at < self.cache_s:
                return list(self._results)
            if self._running is not None:
                await self._running.wait()
                continue
            self._running = done = trio.Event()
            try:
                results = await self.run_all()
                self._results, self._results_at = results, trio.current_time()
                return list(results)
            finally:
                self._running = None
                done.set()

    async def refresh(self) -> list[Check]:
        """A run now (the admin asked): the cache is dropped, then :meth:`latest`."""
        self._results = None
        return await self.latest()

    def add(self, name: str, fn: CheckFn) -> None:
        self._checks[name] = fn

    async def run_all(self) -> list[Check]:
        """Every check now, concurrently (readers use :meth:`latest`)."""
        self.runs += 1
        results: dict[str, list[Check]] = {}

        async def one(name: str, fn: CheckFn) -> None:
            with trio.move_on_after(self.check_timeout_s) as scope:
                try:
                    results[name] = await fn()
                except Exception as exc:  # a broken check is reported, never propagated
                    log.exception("health check %s raised", name)
                    results[name] = [Check(name=name, status=Status.FAIL,
                                           message=Text("the check itself failed: {error}", error=repr(exc)),
                                           fix=Text("report this to support with the logs"))]
            if scope.cancelled_caught:
                results[name] = [Check(name=name, status=Status.FAIL,
                                       message=Text("the check did not finish within {seconds} s",
                                                    seconds=format(self.check_timeout_s, "g")),
                                       fix=Text("see the logs; the component may be stuck"))]

        async with trio.open_nursery() as nursery:
            for name, fn in self._checks.items():
                nursery.start_soon(one, name, fn)
        return [c for name in self._checks for c in results.get(name, [])]
