"""slo-deadline-ordering-policy: earliest enqueue + x-llm-d-slo-ttft-ms first; requests without an
objective after every request with one, first come first served among themselves."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.classify import classify
from sidecar.outcome import ScriptStatus
from sidecar.policies import SloDeadlineOrdering
from sidecar.policies.base import QueuedItem, WorkloadView
from tests.conftest import Backend, make_config

SLO_BAND = {
    "priorityBands": [
        {"priority": 0, "orderingPolicy": {"type": "slo-deadline-ordering-policy"}},
    ]
}


async def test_dispatch_follows_the_slo_deadline_and_no_objective_comes_last(
    backend: Backend,
) -> None:
    store = backend.store(make_config(limit=1, flowControl=SLO_BAND))
    await store.configure(now=0)
    args: dict[str, Any] = {"band": 0, "flow": "f", "workload": "", "criticality": 3}
    common = {"byte_size": 1, "ttl_ms": 60_000}
    holder = await store.enqueue(now=10, **args, **common)
    assert holder.status is ScriptStatus.DISPATCHED
    first_plain = await store.enqueue(now=20, **args, **common)
    loose = await store.enqueue(now=30, **args, **common, slo_ms=5_000)  # due 5030
    tight = await store.enqueue(now=40, **args, **common, slo_ms=1_000)  # due 1040
    second_plain = await store.enqueue(now=50, **args, **common)
    order, current, now = [], holder.item_id, 100
    for _ in range(4):
        reply = await store.release(current, now=now)
        (delivery,) = reply.deliveries
        order.append(delivery.item_id)
        current, now = delivery.item_id, now + 10
    expected = [tight, loose, first_plain, second_plain]
    assert order == [r.item_id for r in expected]


def test_the_python_policy_orders_as_the_scripts_do() -> None:
    policy = SloDeadlineOrdering()
    view = WorkloadView()

    def key(seq: int, enq: int, slo: int) -> float:
        item = QueuedItem(seq=seq, enqueued_ms=enq, deadline_ms=0, workload_id="", criticality=3,
                          slo_ms=slo)  # fmt: skip
        return policy.sort_key(item, view)

    assert key(3, 40, 1_000) < key(2, 30, 5_000) < key(1, 20, 0) < key(4, 50, 0)


@pytest.mark.parametrize(
    ("headers", "slo"),
    [
        ({"x-llm-d-slo-ttft-ms": "250"}, 250),
        ({"x-slo-ttft-ms": "120.2"}, 121),
        # The llm-d name wins when both are sent, as in llm-d (consts.go headerAliases).
        ({"x-llm-d-slo-ttft-ms": "80", "x-slo-ttft-ms": "999"}, 80),
        ({}, 0),
        ({"x-llm-d-slo-ttft-ms": "soon"}, 0),  # lenient: unusable means no objective
        ({"x-llm-d-slo-ttft-ms": "-5"}, 0),
    ],
)
def test_the_objective_header_is_read_under_both_names(headers: dict[str, str], slo: int) -> None:
    request = classify(
        headers, pool="p", objectives={}, default_ttl_ms=1_000, max_ttl_ms=1_000, strict=False
    )
    assert request.slo_ttft_ms == slo
