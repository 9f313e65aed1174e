"""The supervisor's restart policy for crashed services, as a pure decision table.

A crash is answered with a delay before the restart (exponential, capped), unless the
service crashed more than ``max_crashes`` times within ``window_s``: then it is failed
and stays down (visible on the homepage and in /readyz) instead of flapping forever.
A service that stayed up for a whole window starts again from a short delay.
"""

from __future__ import annotations

from collections import deque

import attrs

__all__ = ["RestartDecision", "RestartPolicy"]


@attrs.frozen(kw_only=True)
class RestartDecision:
    """``restart_in_s`` is None when the service is to be marked failed."""

    restart_in_s: float | None
    crashes_in_window: int


class RestartPolicy:
    def __init__(self, *, initial_s: float, max_s: float, max_crashes: int, window_s: float) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.max_crashes = max_crashes
        self.window_s = window_s
        self._crashes: deque[float] = deque()

    def on_crash(self, now: float) -> RestartDecision:
        while self._crashes and self._crashes[0] <= now - self.window_s:
            self._crashes.popleft()
        self._crashes.append(now)
        n = len(self._crashes)
        if n > self.max_crashes:
            return RestartDecision(restart_in_s=None, crashes_in_window=n)
        return RestartDecision(restart_in_s=min(self.max_s, self.initial_s * 2 ** (n - 1)), crashes_in_window=n)
