"""Fairness and ordering policies, registered by their GIE type names.

Policies are plain values built from ``{type, parameters}``; none of them is handed the workload
registry. The workload-aware policy reads metrics through the arguments of ``score``.
"""

from sidecar.policies.base import (
    FairnessPolicy,
    OrderingPolicy,
    PolicyError,
    build_fairness,
    build_ordering,
    fairness_types,
    ordering_types,
)
from sidecar.policies.fairness import GlobalStrictFairness, RoundRobinFairness
from sidecar.policies.ordering import (
    EdfOrdering,
    FcfsOrdering,
    SloDeadlineOrdering,
    WorkloadAwareOrdering,
)

__all__ = [
    "EdfOrdering",
    "FairnessPolicy",
    "FcfsOrdering",
    "GlobalStrictFairness",
    "OrderingPolicy",
    "PolicyError",
    "RoundRobinFairness",
    "SloDeadlineOrdering",
    "WorkloadAwareOrdering",
    "build_fairness",
    "build_ordering",
    "fairness_types",
    "ordering_types",
]
