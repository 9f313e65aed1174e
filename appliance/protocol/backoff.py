"""Capped exponential backoff with jitter, shared by every retry loop.

Full jitter would make a retry immediate half the time; here the delay is drawn in
``[base * (1 - jitter), base]`` so boxes of many shops spread out after a cloud outage
without hammering it in the first second (the "decorrelated" spread of the AWS
architecture note, bounded below).
"""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Delays of ``initial * factor**n`` capped at ``maximum``, jittered down by up to ``jitter``."""

    def __init__(
        self,
        initial: float,
        maximum: float,
        *,
        factor: float = 2.0,
        jitter: float = 0.25,
        rng: random.Random | None = None,
    ) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError(f"need 0 < initial <= maximum, got {initial}, {maximum}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self._rng = rng or random.Random()
        self.attempts = 0

    def next_delay(self) -> float:
        """The delay before the next attempt; each call counts one failure."""
        base = min(self.maximum, self.initial * self.factor ** min(self.attempts, 64))
        self.attempts += 1
        return base * (1 - self.jitter * self._rng.random())

    def reset(self) -> None:
        """A success: the next failure starts again from ``initial``."""
        self.attempts = 0
