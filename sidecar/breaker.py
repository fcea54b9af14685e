"""A circuit breaker for Redis: after repeated failures, stop waiting on it for a while.

It judges store calls (one script call, or one coalesced batch), never a request's wait in the
queue: PoolStore runs every call inside ``guard()``. Closed: calls go through. After ``threshold``
consecutive failures it opens: calls fail at once with BreakerOpen (the failure mode decides what
the request gets) for ``cooldown_s``. Then one trial call is let through (half-open); its success
closes the breaker, its failure opens it again, and a trial that ends any other way (cancelled)
gives the next call its turn. The trial is resolved in a ``finally``, so it can never stay open.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sidecar.errors import StoreError


class BreakerOpen(StoreError):
    """Refused without calling the store: the breaker is open."""


class CircuitBreaker:
    def __init__(
        self,
        threshold: int = 3,
        cooldown_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        # Called with True when the breaker opens and False when it closes (a metric follows it).
        self.on_change = on_change
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_running = False

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def allow(self) -> bool:
        """Whether a call may go to Redis now; True makes that call the trial when half-open."""
        if self._opened_at is None:
            return True
        if self._trial_running or self._clock() - self._opened_at < self.cooldown_s:
            return False
        self._trial_running = True
        return True

    @contextmanager
    def guard(self) -> Iterator[None]:
        """One store call: refused with BreakerOpen, or judged by how it ends."""
        if not self.allow():
            raise BreakerOpen("circuit open: Redis failed repeatedly; refusing without calling it")
        try:
            yield
        except StoreError:
            self.failure()
            raise
        except BaseException:
            # Neither a success nor a store failure (cancelled, a bug): the trial, if this was
            # it, is over without a verdict, and the next call may try.
            self._trial_running = False
            raise
        else:
            self.success()

    def success(self) -> None:
        was_open = self.is_open
        self._failures = 0
        self._opened_at = None
        self._trial_running = False
        if was_open and self.on_change is not None:
            self.on_change(False)

    def failure(self) -> None:
        was_open = self.is_open
        self._failures += 1
        self._trial_running = False
        if self._opened_at is not None or self._failures >= self.threshold:
            self._opened_at = self._clock()
            if not was_open and self.on_change is not None:
                self.on_change(True)
