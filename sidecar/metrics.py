"""Prometheus metrics, named, labelled and valued as llm-d's flow control names them.

The canonical series are llm-d's ``llm_d_epp_flow_control_*`` (names, label names and outcome label
values from llm-d/llm-d-router pkg/epp/metrics/llm_d_router_metrics.go and docs/metrics.md). The
``inference_extension_flow_control_*`` series this sidecar emitted before stay, unchanged, as
deprecated twins: llm-d emits its own old names the same way (dual emission), so dashboards built
on either keep working.

Per-replica series (outcomes, queue and enqueue durations, script latency, failure-mode decisions)
count what this replica saw. Pool-wide gauges (queue size/bytes, saturation, capacity utilisation,
per-workload metrics) are read from Redis on each scrape and are the same on every replica: their
help text says so, so dashboards should take max() rather than sum() across replicas.

llm-d series with no counterpart here: ``dispatch_cycle_duration_seconds`` (dispatch happens inside
the enqueue/release scripts, timed by admission_sidecar_redis_script_duration_seconds) and the
in-flight eviction series (``revocations_*``, ``reclaim_target``, ``pending_reclaim``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sidecar.outcome import LLM_D_NOT_YET_FINALIZED, LLM_D_OUTCOME, Outcome

if TYPE_CHECKING:
    from sidecar.config import Config
    from sidecar.state import PoolState

LLM_D = "llm_d_epp_flow_control"
OLD = "inference_extension_flow_control"
OTHER = "other"
# llm-d labels queue series with the request's model; the sidecar does not read request bodies,
# so both model labels are empty (in PromQL, the same as absent).
NO_MODEL = ""
# The only saturation detector so far; it has no endpoints whose metrics could go stale.
DETECTOR = "concurrency-detector"
# llm-d's queue-duration buckets (up to 60 s), extended to our default maxRequestTTL of 5 min.
_LLM_D_QUEUE_BUCKETS = (
    *(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    *(120, 300),
)
# llm-d's enqueue buckets (up to 100 ms), extended: our enqueue is a Redis round trip.
_ENQUEUE_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1)
# The deprecated series keep the buckets they always had, so their quantiles do not shift.
_DURATION_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_CHILD_CACHE = 10_000
_SCRIPT_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)

POOL_WIDE = "Pool-wide, read from Redis: the same on every replica."
_QUEUE_LABELS = ["fairness_id", "priority", "inference_pool", "model_name", "target_model_name"]
_QUEUE_DURATION_LABELS = [*_QUEUE_LABELS[:2], "outcome", *_QUEUE_LABELS[2:]]


def deprecated(name: str) -> str:
    """The help prefix llm-d gives its deprecated twins."""
    return f"[Deprecated: Use {name}] "


def llm_d_outcome(outcome: str) -> str:
    """llm-d's label value for one of our outcomes; unknown words pass through unchanged."""
    try:
        return LLM_D_OUTCOME[Outcome(outcome)]
    except ValueError:
        return outcome


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
        self._outcome_children: dict[tuple[str, int, str], tuple[Any, ...]] = {}
        self._enqueue_children: dict[tuple[str | None, int, str], tuple[Any, Any]] = {}
        self._script_latency: dict[str, Any] = {}
        self._init_llm_d()
        self._init_deprecated()
        self._init_sidecar()

    def _init_llm_d(self) -> None:
        r = self.registry
        self.llmd_queue_duration = Histogram(
            f"{LLM_D}_request_queue_duration_seconds",
            "Time a request spent in the flow control layer, from enqueue to its outcome (this "
            "replica). model_name and target_model_name are empty: the body is not read.",
            _QUEUE_DURATION_LABELS,
            buckets=_LLM_D_QUEUE_BUCKETS,
            registry=r,
        )
        self.llmd_enqueue_duration = Histogram(
            f"{LLM_D}_request_enqueue_duration_seconds",
            "Time taken to enqueue a request: the enqueue script's round trip, capacity checks "
            "included (this replica). outcome NotYetFinalized: the request was left queued.",
            ["fairness_id", "priority", "outcome"],
            buckets=_ENQUEUE_BUCKETS,
            registry=r,
        )
        self.llmd_requests = Counter(
            f"{LLM_D}_requests",
            "Requests processed by the flow control layer, once per request at its outcome "
            "(this replica).",
            ["outcome", "priority", "inference_pool"],
            registry=r,
        )
        self.llmd_queue_size = Gauge(
            f"{LLM_D}_queue_size",
            f"Requests held in the flow control queue, by flow and band. {POOL_WIDE}",
            _QUEUE_LABELS,
            registry=r,
        )
        self.llmd_queue_bytes = Gauge(
            f"{LLM_D}_queue_bytes",
            "Bytes of requests held in the flow control queue, by band: the pool counts bytes per "
            f"band, not per flow, so fairness_id is empty. {POOL_WIDE}",
            _QUEUE_LABELS,
            registry=r,
        )
        self.llmd_saturation = Gauge(
            f"{LLM_D}_pool_saturation",
            "Pool saturation signal gating dispatch: in-flight requests / maxConcurrency "
            "(concurrency-detector), or the average over endpoints of max(waiting / "
            "queueDepthThreshold, kvCache / kvCacheUtilThreshold) from the newest sample, 1.0 "
            "when it is stale (utilization-detector); 1.0 is the gating set point. Only stage "
            "'effective': there "
            f"are no prefill/decode roles. {POOL_WIDE}",
            ["inference_pool", "stage"],
            registry=r,
        )
        self.llmd_stale_endpoints = Gauge(
            f"{LLM_D}_stale_endpoints",
            "Endpoints whose metrics are missing or stale, counted as saturated (fail closed): "
            "utilization-detector; all of them when its newest sample is itself stale. Always 0 "
            "under concurrency-detector, which reads no endpoint metrics. "
            f"{POOL_WIDE}",
            ["detector"],
            registry=r,
        )
        self.llmd_band_utilization_requests = Gauge(
            f"{LLM_D}_capacity_utilization_requests",
            "Queued requests of a band / its maxRequests (0.0-1.0); bands without a cap of their "
            f"own report no series. {POOL_WIDE}",
            ["priority", "inference_pool"],
            registry=r,
        )
        self.llmd_band_utilization_bytes = Gauge(
            f"{LLM_D}_capacity_utilization_bytes",
            "Queued bytes of a band / its maxBytes (0.0-1.0); bands without a cap of their own "
            f"report no series. {POOL_WIDE}",
            ["priority", "inference_pool"],
            registry=r,
        )
        self.llmd_global_utilization_requests = Gauge(
            f"{LLM_D}_global_capacity_utilization_requests",
            "Queued requests of all bands / flowControl.maxRequests (0.0-1.0); absent when "
            f"unlimited. {POOL_WIDE}",
            ["inference_pool"],
            registry=r,
        )
        self.llmd_global_utilization_bytes = Gauge(
            f"{LLM_D}_global_capacity_utilization_bytes",
            "Queued bytes of all bands / flowControl.maxBytes (0.0-1.0); absent when unlimited. "
            f"{POOL_WIDE}",
            ["inference_pool"],
            registry=r,
        )

    def _init_deprecated(self) -> None:
        r = self.registry
        self.queue_duration = Histogram(
            f"{OLD}_request_queue_duration_seconds",
            deprecated(f"{LLM_D}_request_queue_duration_seconds")
            + "Time a request spent in the flow control queue until its outcome (this replica).",
            ["fairness_id", "priority", "outcome", "inference_pool"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.enqueue_duration = Histogram(
            f"{OLD}_request_enqueue_duration_seconds",
            deprecated(f"{LLM_D}_request_enqueue_duration_seconds")
            + "Time taken to enqueue a request (this replica).",
            ["fairness_id", "priority", "outcome"],
            buckets=_ENQUEUE_BUCKETS,
            registry=r,
        )
        self.outcomes = Counter(
            f"{OLD}_request_outcomes",
            deprecated(f"{LLM_D}_requests_total") + "Requests by outcome (this replica).",
            ["outcome", "priority", "inference_pool"],
            registry=r,
        )
        self.queue_size = Gauge(
            f"{OLD}_queue_size",
            deprecated(f"{LLM_D}_queue_size")
            + f"Requests queued in the pool, by band and flow. {POOL_WIDE}",
            ["fairness_id", "priority", "inference_pool"],
            registry=r,
        )
        self.queue_bytes = Gauge(
            f"{OLD}_queue_bytes",
            deprecated(f"{LLM_D}_queue_bytes")
            + f"Bytes of queued requests in the pool, by band. {POOL_WIDE}",
            ["priority", "inference_pool"],
            registry=r,
        )
        self.saturation = Gauge(
            f"{OLD}_pool_saturation",
            deprecated(f"{LLM_D}_pool_saturation")
            + f"In-flight requests / maxConcurrency of the pool. {POOL_WIDE}",
            ["inference_pool"],
            registry=r,
        )
        self.old_inflight = Gauge(
            f"{OLD}_pool_inflight_requests",
            deprecated("admission_sidecar_pool_inflight_requests")
            + f"In-flight requests of the pool. {POOL_WIDE}",
            ["inference_pool"],
            registry=r,
        )

    def _init_sidecar(self) -> None:
        r = self.registry
        self.inflight = Gauge(
            "admission_sidecar_pool_inflight_requests",
            f"In-flight requests of the pool. {POOL_WIDE}",
            ["inference_pool"],
            registry=r,
        )
        self.workload_rate = Gauge(
            "admission_sidecar_workload_request_rate",
            f"Requests/s of a workload over the registry window. {POOL_WIDE} Label values are "
            "capped; the rest report as 'other'.",
            ["workload_id", "inference_pool"],
            registry=r,
        )
        self.workload_wait = Gauge(
            "admission_sidecar_workload_average_wait_seconds",
            f"EMA of a workload's queue waits. {POOL_WIDE}",
            ["workload_id", "inference_pool"],
            registry=r,
        )
        self.workload_active = Gauge(
            "admission_sidecar_workload_active_requests",
            f"Queued + in-flight requests of a workload. {POOL_WIDE}",
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
        """Counts one request's outcome (ours, e.g. ``dispatched``) under both naming schemes."""
        # Labelled children are cached: labels() costs more than the increment on the hot path.
        key = (outcome, priority, fairness_id)
        children = self._outcome_children.get(key)
        if children is None:
            band, flow, llm_d = str(priority), self.flow_label(fairness_id), llm_d_outcome(outcome)
            children = (
                self.outcomes.labels(outcome, band, self.pool),
                self.llmd_requests.labels(llm_d, band, self.pool),
                self.queue_duration.labels(flow, band, outcome, self.pool),
                self.llmd_queue_duration.labels(flow, band, llm_d, self.pool, NO_MODEL, NO_MODEL),
            )
            if len(self._outcome_children) < _CHILD_CACHE:
                self._outcome_children[key] = children
        children[0].inc()
        children[1].inc()
        children[2].observe(wait_s)
        children[3].observe(wait_s)

    def record_enqueue(
        self, outcome: str | None, priority: int, fairness_id: str, seconds: float
    ) -> None:
        """Times one enqueue; ``outcome`` None when the request was left queued."""
        key = (outcome, priority, fairness_id)
        children = self._enqueue_children.get(key)
        if children is None:
            band, flow = str(priority), self.flow_label(fairness_id)
            llm_d = LLM_D_NOT_YET_FINALIZED if outcome is None else llm_d_outcome(outcome)
            # The twin takes llm-d's values too: it had no values of its own to keep.
            children = (
                self.llmd_enqueue_duration.labels(flow, band, llm_d),
                self.enqueue_duration.labels(flow, band, llm_d),
            )
            if len(self._enqueue_children) < _CHILD_CACHE:
                self._enqueue_children[key] = children
        children[0].observe(seconds)
        children[1].observe(seconds)

    def time_script(self, name: str) -> _ScriptTimer:
        """Times one script call and counts its errors (a context manager)."""
        latency = self._script_latency.get(name)
        if latency is None:
            # Script names are a fixed set: the cache cannot grow past it.
            latency = self._script_latency[name] = self.script_latency.labels(name)
        return _ScriptTimer(self, name, latency)

    def export_pool(self, snapshot: PoolState, config: Config | None = None) -> None:
        """Sets every pool-wide gauge, llm-d's and their twins, from one snapshot of Redis.
        ``config`` supplies the queue caps that the capacity-utilisation ratios divide by."""
        pool = self.pool
        for gauge in (
            self.queue_size,
            self.queue_bytes,
            self.llmd_queue_size,
            self.llmd_queue_bytes,
        ):
            gauge.clear()
        self.saturation.labels(pool).set(snapshot.saturation)
        self.llmd_saturation.labels(pool, "effective").set(snapshot.saturation)
        self.llmd_stale_endpoints.clear()
        self.llmd_stale_endpoints.labels(snapshot.detector).set(snapshot.stale_endpoints)
        self.inflight.labels(pool).set(snapshot.inflight)
        self.old_inflight.labels(pool).set(snapshot.inflight)
        for band in snapshot.bands:
            priority = str(band.priority)
            self.queue_bytes.labels(priority, pool).set(band.queued_bytes)
            self.llmd_queue_bytes.labels("", priority, pool, NO_MODEL, NO_MODEL).set(
                band.queued_bytes
            )
            for flow in band.flows:
                # inc, not set: flows past the label cap add up under 'other'.
                label = self.flow_label(flow.flow)
                self.queue_size.labels(label, priority, pool).inc(flow.queued)
                self.llmd_queue_size.labels(label, priority, pool, NO_MODEL, NO_MODEL).inc(
                    flow.queued
                )
        if config is not None:
            self._export_capacity(snapshot, config)
        for gauge in (self.workload_rate, self.workload_wait, self.workload_active):
            gauge.clear()
        for w in snapshot.workloads:
            label = self.workload_label(w.workload_id)
            self.workload_rate.labels(label, pool).inc(w.request_rate)
            self.workload_wait.labels(label, pool).set(w.avg_wait_s)
            self.workload_active.labels(label, pool).inc(w.active)

    def _export_capacity(self, snapshot: PoolState, config: Config) -> None:
        pool, fc = self.pool, config.flow_control
        gauges = (
            self.llmd_band_utilization_requests,
            self.llmd_band_utilization_bytes,
            self.llmd_global_utilization_requests,
            self.llmd_global_utilization_bytes,
        )
        for gauge in gauges:
            gauge.clear()
        queued = {b.priority: (b.queued, b.queued_bytes) for b in snapshot.bands}
        # Band 0, every listed band and every band with queue state, as llm-d reports every
        # configured band (and always provisions band 0).
        for priority in sorted({0, *config.bands, *queued}):
            band, (n, size) = config.band(priority), queued.get(priority, (0, 0))
            if band.max_requests > 0:
                gauges[0].labels(str(priority), pool).set(n / band.max_requests)
            if band.max_bytes > 0:
                gauges[1].labels(str(priority), pool).set(size / band.max_bytes)
        if fc.max_requests > 0:
            gauges[2].labels(pool).set(snapshot.queued / fc.max_requests)
        if fc.max_bytes > 0:
            gauges[3].labels(pool).set(snapshot.queued_bytes / fc.max_bytes)


class _ScriptTimer:
    """``Metrics.time_script``: a class rather than a generator, as it wraps every store call."""

    __slots__ = ("_latency", "_metrics", "_name", "_start")

    def __init__(self, metrics: Metrics, name: str, latency: Any) -> None:
        self._metrics = metrics
        self._name = name
        self._latency = latency
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, exc_type: type[BaseException] | None, *_rest: object) -> None:
        # Errors, not cancellations, count as failed calls (as `except Exception` would).
        if exc_type is not None and issubclass(exc_type, Exception):
            # Looked up only on an error, so a script's error series appears with its first.
            self._metrics.script_errors.labels(self._name).inc()
        self._latency.observe(time.perf_counter() - self._start)
