"""A circuit breaker: after enough consecutive failures a dependency is left alone for a
while, then tried again with one request. The upstream client (``upstream.py``) keeps one:
while it is open its model reports no live worker, so requests go to the plan's fallback
or are refused at once instead of each waiting for the upstream's timeout."""

from __future__ import annotations

import time
from typing import Any


class CircuitBreaker:
    """Consecutive failures open it; after ``reset_s`` one trial is let through."""

    def __init__(self, *, failures: int, reset_s: float, clock: Any = time.monotonic) -> None:
        self.failures_to_open = failures
        self.reset_s = reset_s
        self._clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self._trial = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        if self._clock() - self.opened_at >= self.reset_s:
            return "half-open"
        return "open"

    def allow(self) -> bool:
        """May a request go upstream now? In half-open state, only one at a time."""
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self._trial:
            self._trial = True
            return True
        return False

    def success(self) -> None:
        self.failures, self.opened_at, self._trial = 0, None, False

    def release(self) -> None:
        """A trial request ended without a verdict (its client went away)."""
        self._trial = False

    def failure(self) -> None:
        self.failures += 1
        self._trial = False
        if self.opened_at is not None or self.failures >= self.failures_to_open:
            self.opened_at = self._clock()
