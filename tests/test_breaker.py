"""The Redis circuit breaker: opens after repeated failures, half-opens for one trial."""

from __future__ import annotations

from sidecar.breaker import CircuitBreaker


def test_opens_after_threshold_and_recovers_through_one_trial() -> None:
    now = [0.0]
    breaker = CircuitBreaker(threshold=3, cooldown_s=1.0, clock=lambda: now[0])
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    assert not breaker.is_open
    breaker.failure()
    assert breaker.is_open and not breaker.allow()
    now[0] = 0.99
    assert not breaker.allow()
    now[0] = 1.0
    assert breaker.allow()  # the one trial
    assert not breaker.allow()  # nobody else while it runs
    breaker.failure()  # trial failed: open again for a full cool-down
    now[0] = 1.5
    assert not breaker.allow()
    now[0] = 2.0
    assert breaker.allow()
    breaker.success()
    assert not breaker.is_open and breaker.allow() and breaker.allow()


def test_success_resets_the_failure_count() -> None:
    breaker = CircuitBreaker(threshold=2)
    breaker.failure()
    breaker.success()
    breaker.failure()
    assert not breaker.is_open
