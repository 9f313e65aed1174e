"""Where services register their health checks, and how they are all run at once.

A check function is async and returns a list of :class:`~appliance.protocol.health.Check`.
Each runs under its own deadline; one that raises or overruns becomes a ``fail`` check
saying so, so a broken check never hides the others.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from appliance.protocol.health import Check, Status

__all__ = ["CheckFn", "HealthRegistry"]

CheckFn = Callable[[], Awaitable[list[Check]]]
log = logging.getLogger(__name__)


class HealthRegistry:
    def __init__(self, *, check_timeout_s: float = 5.0) -> None:
        self.check_timeout_s = check_timeout_s
        self._checks: dict[str, CheckFn] = {}

    def add(self, name: str, fn: CheckFn) -> None:
        self._checks[name] = fn

    async def run_all(self) -> list[Check]:
        results: dict[str, list[Check]] = {}

        async def one(name: str, fn: CheckFn) -> None:
            with trio.move_on_after(self.check_timeout_s) as scope:
                try:
                    results[name] = await fn()
                except Exception as exc:  # a broken check is reported, never propagated
                    log.exception("health check %s raised", name)
                    results[name] = [Check(name=name, status=Status.FAIL, message=f"the check itself failed: {exc!r}",
                                           fix="report this to support with the logs")]
            if scope.cancelled_caught:
                results[name] = [Check(name=name, status=Status.FAIL,
                                       message=f"the check did not finish within {self.check_timeout_s:g} s",
                                       fix="see the logs; the component may be stuck")]

        async with trio.open_nursery() as nursery:
            for name, fn in self._checks.items():
                nursery.start_soon(one, name, fn)
        return [c for name in self._checks for c in results.get(name, [])]
