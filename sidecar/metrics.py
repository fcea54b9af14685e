"""Prometheus metrics, named and labelled as GIE's flow control names them.

Per-replica series (outcomes, queue durations, script latency, failure-mode decisions) count
what this replica saw. Pool-wide gauges (queue size/bytes, saturation, per-workload metrics) are
read from Redis on each scrape and are the same on every replica: their help text says so, so
dashboards should take max() rather than sum() across replicas.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_P = "inference_extension_flow_control"
OTHER = "other"
# Queue durations span fast-path microseconds to multi-minute waits.
_DURATION_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_CHILD_CACHE = 10_000
_SCRIPT_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class LabelCap:
    """Caps the distinct values of a label; values past the cap are reported as ``other``."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return OTHER
        self._seen.add(value)
        return value


class Metrics:
    """Every series the sidecar exports, on its own registry (tests make as many as they like)."""

    def __init__(self, pool: str, workload_label_limit: int = 100) -> None:
        self.pool = pool
        self.registry = CollectorRegistry(auto_describe=True)
        self.workload_label = LabelCap(workload_label_limit)
        self.flow_label = LabelCap(workload_label_limit)
        self._outcome_children: dict[tuple[str, int, str], tuple[Any, Any]] = {}
        r = self.registry
        self.queue_duration = Histogram(
            f"{_P}_request_queue_duration_seconds",
            "Time a request spent in the flow control queue until its outcome (this replica).",
            ["fairness_id", "priority", "outcome", "inference_pool"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.outcomes = Counter(
            f"{_P}_request_outcomes",
            "Requests by outcome (this replica).",
            ["outcome", "priority", "inference_pool"],
            registry=r,
        )
        self.queue_size = Gauge(
            f"{_P}_queue_size",
            "Requests queued in the pool, by band and flow. Pool-wide, read from Redis: the same "
            "on every replica.",
            ["fairness_id", "priority", "inference_pool"],
            registry=r,
        )
        self.queue_bytes = Gauge(
            f"{_P}_queue_bytes",
            "Bytes of queued requests in the pool, by band. Pool-wide, read from Redis: the same "
            "on every replica.",
            ["priority", "inference_pool"],
            registry=r,
        )
        self.saturation = Gauge(
            f"{_P}_pool_saturation",
            "In-flight requests / maxConcurrency of the pool. Pool-wide, read from Redis: the "
            "same on every replica.",
            ["inference_pool"],
            registry=r,
        )
        self.inflight = Gauge(
            f"{_P}_pool_inflight_requests",
            "In-flight requests of the pool. Pool-wide, read from Redis: the same on every "
            "replica.",
            ["inference_pool"],
            registry=r,
        )
        self.workload_rate = Gauge(
            "admission_sidecar_workload_request_rate",
            "Requests/s of a workload over the registry window. Pool-wide, read from Redis: the "
            "same on every replica. Label values are capped; the rest report as 'other'.",
            ["workload_id", "inference_pool"],
            registry=r,
        )
        self.workload_wait = Gauge(
            "admission_sidecar_workload_average_wait_seconds",
            "EMA of a workload's queue waits. Pool-wide, read from Redis: the same on every "
            "replica.",
            ["workload_id", "inference_pool"],
            registry=r,
        )
        self.workload_active = Gauge(
            "admission_sidecar_workload_active_requests",
            "Queued + in-flight requests of a workload. Pool-wide, read from Redis: the same on "
            "every replica.",
            ["workload_id", "inference_pool"],
            registry=r,
        )
        self.script_latency = Histogram(
            "admission_sidecar_redis_script_duration_seconds",
            "Round-trip time of one Lua script call (this replica).",
            ["script"],
            buckets=_SCRIPT_BUCKETS,
            registry=r,
        )
        self.script_errors = Counter(
            "admission_sidecar_redis_errors",
            "Redis calls that failed (this replica).",
            ["script"],
            registry=r,
        )
        self.failure_mode = Counter(
            "admission_sidecar_failure_mode_decisions",
            "Requests decided without Redis: forwarded unadmitted (open) or refused (closed).",
            ["mode", "reason"],
            registry=r,
        )
        self.breaker_open = Gauge(
            "admission_sidecar_redis_circuit_open",
            "1 while the Redis circuit breaker is open (this replica).",
            registry=r,
        )

    def record_outcome(self, outcome: str, priority: int, fairness_id: str, wait_s: float) -> None:
        # Labelled children are cached: labels() costs more than the increment on the hot path.
        key = (outcome, priority, fairness_id)
        children = self._outcome_children.get(key)
        if children is None:
            band, flow = str(priority), self.flow_label(fairness_id)
            children = (
                self.outcomes.labels(outcome, band, self.pool),
                self.queue_duration.labels(flow, band, outcome, self.pool),
            )
            if len(self._outcome_children) < _CHILD_CACHE:
                self._outcome_children[key] = children
        children[0].inc()
        children[1].observe(wait_s)

    @contextmanager
    def time_script(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except Exception:
            self.script_errors.labels(name).inc()
            raise
        finally:
            self.script_latency.labels(name).observe(time.perf_counter() - start)
