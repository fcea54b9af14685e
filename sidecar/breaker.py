"""A circuit breaker for Redis: after repeated failures, stop waiting on it for a while.

Closed: calls go through. After ``threshold`` consecutive failures it opens: calls are refused at
once (the failure mode decides what the request gets) for ``cooldown_s``. Then one trial call is let
through (half-open); its success closes the breaker, its failure opens it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class CircuitBreaker:
    def __init__(
        self,
        threshold: int = 3,
        cooldown_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_running = False

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def allow(self) -> bool:
        """Whether a call may go to Redis now."""
        if self._opened_at is None:
            return True
        if self._trial_running or self._clock() - self._opened_at < self.cooldown_s:
            return False
        self._trial_running = True  # half-open: exactly one trial
        return True

    def success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._trial_running = False

    def failure(self) -> None:
        self._failures += 1
        self._trial_running = False
        if self._opened_at is not None or self._failures >= self.threshold:
            self._opened_at = self._clock()
