"""Reference implementations of the ordering policies.

Dispatch runs in Lua (lua/includes/ordering.lua); these classes compute the same sort keys with
the same floating-point operations in the same order, so tests can compare dispatch orders exactly.
"""

from __future__ import annotations

import math
from typing import ClassVar

import msgspec

from sidecar import contract
from sidecar.policies.base import OrderingPolicy, QueuedItem, WorkloadView, register_ordering


def rank_units(x: float) -> float:
    """A part of a workload-aware key in whole units of 1 / contract.RANK_KEY_SCALE, rounded half
    up (the Lua twin: lua/includes/ordering.lua rank_units; whole numbers below 2**53 are exact
    doubles, so sums of them are too)."""
    return float(math.floor(x * contract.RANK_KEY_SCALE + 0.5))


@register_ordering
class FcfsOrdering(OrderingPolicy, msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """First come, first served."""

    type_name: ClassVar[str] = "fcfs-ordering-policy"
    lua_code: ClassVar[str] = "fcfs"

    def sort_key(self, item: QueuedItem, metrics: WorkloadView) -> float:
        return float(item.seq)


@register_ordering
class EdfOrdering(OrderingPolicy, msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Earliest deadline (enqueue time + TTL) first."""

    type_name: ClassVar[str] = "edf-ordering-policy"
    lua_code: ClassVar[str] = "edf"

    def sort_key(self, item: QueuedItem, metrics: WorkloadView) -> float:
        return float(item.deadline_ms)


@register_ordering
class SloDeadlineOrdering(OrderingPolicy, msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Earliest SLO deadline first: enqueue time + the request's time-to-first-token objective
    (x-llm-d-slo-ttft-ms). Requests without one come after every request with one, first come
    first served among themselves (as llm-d's slo-deadline-ordering-policy)."""

    type_name: ClassVar[str] = "slo-deadline-ordering-policy"
    lua_code: ClassVar[str] = "slo"

    def sort_key(self, item: QueuedItem, metrics: WorkloadView) -> float:
        if item.slo_ms > 0:
            return float(item.enqueued_ms + item.slo_ms)
        return float(contract.NO_SLO_KEY + item.seq)


@register_ordering
class WorkloadAwareOrdering(
    OrderingPolicy, msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="camel"
):
    """Orders by a score of the workload's average wait, its criticality and its request rate.

    score = min(avgWait/maxWait, 1)*waitTimeWeight + (criticality/5)*criticalityWeight
            - min(rate/maxRate, 1)*requestRateWeight [+ agingWeight * ownWait/maxWait]
    Higher score first. The aging term is linear in time, so ordering by
    ``base - agingWeight*enqueued/maxWait`` is exact with static keys (DESIGN §4).
    """

    type_name: ClassVar[str] = "workload-aware-ordering-policy"
    lua_code: ClassVar[str] = "wa"

    wait_time_weight: float = 0.4
    criticality_weight: float = 0.4
    request_rate_weight: float = 0.2
    max_wait_time_seconds: float = 60.0
    max_request_rate: float = 100.0
    aging_weight: float = 0.0

    def __post_init__(self) -> None:
        for key, value in [
            ("maxWaitTimeSeconds", self.max_wait_time_seconds),
            ("maxRequestRate", self.max_request_rate),
        ]:
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{key} must be a finite number > 0")
        for key, value in [
            ("waitTimeWeight", self.wait_time_weight),
            ("criticalityWeight", self.criticality_weight),
            ("requestRateWeight", self.request_rate_weight),
            ("agingWeight", self.aging_weight),
        ]:
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{key} must be a finite number >= 0")

    def score(self, criticality: int, metrics: WorkloadView) -> float:
        """The reference score at one instant, without the aging term."""
        wait_part = (
            min(metrics.avg_wait_s / self.max_wait_time_seconds, 1.0) * self.wait_time_weight
        )
        crit_part = (criticality / 5.0) * self.criticality_weight
        rate_part = (
            min(metrics.request_rate / self.max_request_rate, 1.0) * self.request_rate_weight
        )
        return wait_part + crit_part - rate_part

    def sort_key(self, item: QueuedItem, metrics: WorkloadView) -> float:
        """Minus the score plus the aging term, in units of 1 / contract.RANK_KEY_SCALE (a whole
        number): lower keys go first, like every other policy.

        It is the sum of a part of the workload and a part of the lane's head, in this order,
        so the scripts can rank a workload's lanes among themselves by the head part alone and
        the workload once, by its best lane (lua/includes/ordering.lua; same doubles)."""
        return self.workload_key(metrics) + self.head_key(item)

    def workload_key(self, metrics: WorkloadView) -> float:
        wait_part = (
            min(metrics.avg_wait_s / self.max_wait_time_seconds, 1.0) * self.wait_time_weight
        )
        rate_part = (
            min(metrics.request_rate / self.max_request_rate, 1.0) * self.request_rate_weight
        )
        return rank_units(rate_part - wait_part)

    def head_key(self, item: QueuedItem) -> float:
        # ``enqueued_ms`` is relative to the pool's epoch, which keeps the aging product small
        # and exact enough.
        age_part = self.aging_weight * (item.enqueued_ms / 1000.0) / self.max_wait_time_seconds
        return rank_units(age_part - (item.criticality / 5.0) * self.criticality_weight)

    def lua_parameters(self) -> list[float]:
        return [
            self.wait_time_weight,
            self.criticality_weight,
            self.request_rate_weight,
            self.max_wait_time_seconds,
            self.max_request_rate,
            self.aging_weight,
        ]
