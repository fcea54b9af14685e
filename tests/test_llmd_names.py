"""llm-d's names end to end: request headers, metric names, labels and outcome values, and the
dropped-reason response header; the older names keep working beside them.

Every expected name below is llm-d's, as written in llm-d/llm-d-router (docs/metrics.md,
pkg/epp/metrics/llm_d_router_metrics.go, pkg/epp/flowcontrol/types/outcomes.go,
pkg/common/error/error.go, pkg/epp/metadata/consts.go).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from sidecar.http.admin import export_pool_gauges
from sidecar.http.outcomes import (
    DROPPED_REASON_HEADER,
    SHUTTING_DOWN,
    STORE_UNAVAILABLE,
    dropped_reason,
    outcome_response,
    unavailable,
)
from sidecar.metrics import Metrics
from sidecar.outcome import LLM_D_OUTCOME, Outcome
from sidecar.simulator import SimulatedModel
from sidecar.state import read_state
from tests.conftest import make_config
from tests.http_harness import Stack, eventually, running_stack

# docs/metrics.md "Flow control": each llm_d_epp_ series and its label names.
LLM_D_LABELS = {
    "request_queue_duration_seconds": {
        "fairness_id",
        "priority",
        "outcome",
        "inference_pool",
        "model_name",
        "target_model_name",
    },
    "queue_size": {"fairness_id", "priority", "inference_pool", "model_name", "target_model_name"},
    "queue_bytes": {"fairness_id", "priority", "inference_pool", "model_name", "target_model_name"},
    "pool_saturation": {"inference_pool", "stage"},
    "stale_endpoints": {"detector"},
    "requests_total": {"outcome", "priority", "inference_pool"},
}
CAPACITY_LABELS = {
    "capacity_utilization_requests": {"priority", "inference_pool"},
    "capacity_utilization_bytes": {"priority", "inference_pool"},
    "global_capacity_utilization_requests": {"inference_pool"},
    "global_capacity_utilization_bytes": {"inference_pool"},
}
# The outcome values docs/metrics.md lists for flow_control_requests_total.
LLM_D_OUTCOMES = {
    "Dispatched",
    "RejectedCapacity",
    "RejectedNoEndpoints",
    "RejectedOther",
    "EvictedTTL",
    "EvictedNoEndpoints",
    "EvictedContextCancelled",
    "EvictedOther",
}
# The RequestDroppedReason values of pkg/common/error/error.go.
LLM_D_DROPPED_REASONS = {
    "rejected-saturated",
    "rejected-no-endpoints",
    "rejected-ttl-expired",
    "rejected-context-cancelled",
    "rejected-shutting-down",
    "evicted",
    "evicted-queue-pressure",
    "evicted-priority",
}
LLM_D = "llm_d_epp_flow_control_"
OLD = "inference_extension_flow_control_"


class Scrape:
    """One /metrics text, parsed."""

    def __init__(self, text: str) -> None:
        self.families: dict[str, Metric] = {f.name: f for f in text_string_to_metric_families(text)}

    def family(self, name: str) -> Metric:
        # The parser names a counter's family without its _total suffix.
        return self.families[name.removesuffix("_total")]

    def labels(self, name: str) -> set[str]:
        """Label names of a series (a histogram's bucket bound 'le' aside)."""
        samples = [s for s in self.family(name).samples if s.name in (name, f"{name}_count")]
        assert samples, f"{name} has no samples"
        return {label for s in samples for label in s.labels} - {"le"}

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        family = self.family(name.removesuffix("_count"))
        return sum(
            s.value for s in family.samples if s.name == name and labels.items() <= s.labels.items()
        )


async def scrape(stack: Stack) -> Scrape:
    async with stack.session.get(f"{stack.admin}/metrics") as r:
        assert r.status == 200
        return Scrape(await r.text())


def config() -> Any:
    return make_config(
        limit=1,
        objectives={"premium": 5},
        flowControl={
            "maxRequests": 10,
            "maxBytes": 1000,
            "defaultPriorityBand": {"maxRequests": 1},
            "priorityBands": [{"priority": 5, "maxRequests": 2, "maxBytes": 100}],
        },
    )


async def get(stack: Stack, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    async with stack.session.get(f"{stack.data}/v1/x", headers=headers) as r:
        await r.read()
        return r.status, dict(r.headers)


async def queued(stack: Stack, n: int) -> None:
    async def check() -> bool:
        return bool((await stack.state())["queued"] == n)

    await eventually(check)


async def test_llm_d_names_labels_and_outcomes_with_deprecated_twins() -> None:
    model = SimulatedModel(latency_s=0)
    model.gate = asyncio.Event()
    async with running_stack(config(), upstream=model) as stack:
        # One request takes the only slot and waits at the upstream's gate.
        holder = asyncio.create_task(get(stack, {"x-llm-d-inference-fairness-id": "tenant-a"}))
        await eventually(lambda: len(model.arrivals) == 1)
        # Band 0 (cap 1): one waits, the next is refused for capacity.
        waiter = asyncio.create_task(
            get(
                stack, {"x-llm-d-inference-fairness-id": "tenant-a", "x-llm-d-inference-ttl": "30s"}
            )
        )
        await queued(stack, 1)
        status, refused = await get(stack, {"x-llm-d-inference-fairness-id": "tenant-a"})
        assert (status, refused[DROPPED_REASON_HEADER]) == (429, "rejected-saturated")
        # Band 5 by objective, under the llm-d names and under the old ones: both time out.
        for headers in (
            {"x-llm-d-inference-objective": "premium", "x-llm-d-inference-ttl": "100ms"},
            {"x-gateway-inference-objective": "premium", "x-gateway-inference-ttl": "100ms"},
        ):
            status, expired = await get(stack, headers)
            assert (status, expired[DROPPED_REASON_HEADER]) == (429, "rejected-ttl-expired")
        # One more waits in band 5 as flow tenant-b, then its client goes away.
        leaving = asyncio.create_task(
            get(
                stack,
                {
                    "x-llm-d-inference-objective": "premium",
                    "x-llm-d-inference-fairness-id": "tenant-b",
                },
            )
        )
        await queued(stack, 2)

        busy = await scrape(stack)
        for series, labels in LLM_D_LABELS.items():
            assert busy.labels(LLM_D + series) == labels, series
        assert busy.value(LLM_D + "queue_size", fairness_id="tenant-a", priority="0") == 1
        assert busy.value(LLM_D + "queue_size", fairness_id="tenant-b", priority="5") == 1
        assert busy.value(LLM_D + "pool_saturation", stage="effective") == 1.0
        assert busy.value(LLM_D + "stale_endpoints", detector="concurrency-detector") == 0
        # The deprecated twins carry the same pool-wide values under their old labels.
        assert busy.value(OLD + "queue_size", fairness_id="tenant-b", priority="5") == 1
        assert busy.value(OLD + "pool_saturation", inference_pool="default") == 1.0
        assert_capacity(stack, await read_state(stack.server.service.controller.store))

        leaving.cancel()

        async def cancelled_counted() -> bool:
            outcome = {"outcome": "EvictedContextCancelled", "priority": "5"}
            return (await scrape(stack)).value(LLM_D + "requests_total", **outcome) == 1

        await eventually(cancelled_counted)
        model.gate.set()
        assert (await holder)[0] == 200
        assert (await waiter)[0] == 200

        final = await scrape(stack)
    assert_outcomes(final)
    assert_help_texts(final)
    # No control header reached the upstream, under either name.
    for arrival in model.arrivals:
        assert not [h for h in arrival.headers if h.startswith(("x-llm-d-", "x-gateway-"))]


def assert_capacity(stack: Stack, snapshot: Any) -> None:
    """The capacity ratios need the caps, which the export takes from the config."""
    service = stack.server.service
    export_pool_gauges(service.metrics, snapshot, service.config)
    ratios = Scrape(generate_latest(service.metrics.registry).decode())
    for series, labels in CAPACITY_LABELS.items():
        assert ratios.labels(LLM_D + series) == labels, series
    # Band 0: 1 queued of 1; band 5: 1 of 2; all bands: 2 of 10.
    assert ratios.value(LLM_D + "capacity_utilization_requests", priority="0") == 1.0
    assert ratios.value(LLM_D + "capacity_utilization_requests", priority="5") == 0.5
    assert ratios.value(LLM_D + "global_capacity_utilization_requests") == 0.2
    # Band 0 has no byte cap, so no bytes series; band 5 has one (nothing queued there has bytes).
    bytes_ratio = ratios.family(LLM_D + "capacity_utilization_bytes")
    assert {s.labels["priority"] for s in bytes_ratio.samples} == {"5"}


def assert_outcomes(final: Scrape) -> None:
    expected = {
        ("Dispatched", "0"): 2,
        ("RejectedCapacity", "0"): 1,
        ("EvictedTTL", "5"): 2,
        ("EvictedContextCancelled", "5"): 1,
    }
    counts = {
        (s.labels["outcome"], s.labels["priority"]): s.value
        for s in final.family(LLM_D + "requests_total").samples
        if s.name == LLM_D + "requests_total"
    }
    assert counts == expected
    assert set(o for o, _ in counts) <= LLM_D_OUTCOMES
    for (outcome, priority), n in expected.items():
        waits = final.value(
            LLM_D + "request_queue_duration_seconds_count", outcome=outcome, priority=priority
        )
        assert waits == n, outcome
    # The deprecated twins count the same requests under the values they always had.
    for (outcome, priority), n in expected.items():
        ours = next(k for k, v in LLM_D_OUTCOME.items() if v == outcome).value
        assert final.value(OLD + "request_outcomes_total", outcome=ours, priority=priority) == n
        assert (
            final.value(
                OLD + "request_queue_duration_seconds_count", outcome=ours, priority=priority
            )
            == n
        )


def assert_help_texts(final: Scrape) -> None:
    for name in ("queue_size", "queue_bytes", "pool_saturation", "stale_endpoints"):
        assert "same on every replica" in final.family(LLM_D + name).documentation, name
    assert "0" in final.family(LLM_D + "stale_endpoints").documentation
    enqueue = final.family(LLM_D + "request_enqueue_duration_seconds")
    assert enqueue.type == "histogram"
    for name, family in final.families.items():
        if name.startswith(OLD):
            assert family.documentation.startswith("[Deprecated: Use "), name


# --- the dropped-reason header ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "value"),
    [
        (Outcome.REJECTED_CAPACITY.value, "rejected-saturated"),
        (Outcome.EVICTED_TTL.value, "rejected-ttl-expired"),
        (Outcome.EVICTED_CANCELLED.value, "rejected-context-cancelled"),
        (SHUTTING_DOWN, "rejected-shutting-down"),
    ],
)
def test_dropped_reason_uses_llm_d_s_value_where_it_has_one(reason: str, value: str) -> None:
    assert dropped_reason(reason) == value
    assert value in LLM_D_DROPPED_REASONS


def test_every_refusal_names_why_it_was_dropped() -> None:
    for outcome in Outcome:
        if outcome is not Outcome.DISPATCHED:
            response = outcome_response(outcome, "m")
            assert response.headers[DROPPED_REASON_HEADER].startswith("rejected-")
    store_down = unavailable(STORE_UNAVAILABLE, "m")
    assert store_down.headers[DROPPED_REASON_HEADER] == "rejected-store-unavailable"
    assert unavailable(SHUTTING_DOWN, "m").headers[DROPPED_REASON_HEADER] == (
        "rejected-shutting-down"
    )


# --- outcome labels --------------------------------------------------------------------------


def test_every_outcome_has_an_llm_d_label_from_llm_d_s_list() -> None:
    assert set(LLM_D_OUTCOME) == set(Outcome)
    assert set(LLM_D_OUTCOME.values()) <= LLM_D_OUTCOMES


def test_record_enqueue_labels_a_request_left_queued_not_yet_finalized() -> None:
    metrics = Metrics("p")
    metrics.record_enqueue(None, 0, "f", 0.001)
    metrics.record_enqueue(Outcome.REJECTED_CAPACITY, 0, "f", 0.001)
    scraped = Scrape(generate_latest(metrics.registry).decode())
    for prefix in (LLM_D, OLD):
        name = prefix + "request_enqueue_duration_seconds_count"
        assert scraped.value(name, outcome="NotYetFinalized") == 1
        assert scraped.value(name, outcome="RejectedCapacity") == 1
    assert scraped.labels(LLM_D + "request_enqueue_duration_seconds") == {
        "fairness_id",
        "priority",
        "outcome",
    }
