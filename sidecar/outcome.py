"""Request outcomes (exactly one per request) and the status codes the Lua scripts return."""

from __future__ import annotations

import enum

from sidecar.contract import ScriptStatus


class Outcome(enum.StrEnum):
    """Our words for outcomes (DESIGN §2); llm-d's metric label for each is ``LLM_D_OUTCOME``."""

    DISPATCHED = "dispatched"
    REJECTED_CAPACITY = "rejected_capacity"
    REJECTED_OTHER = "rejected_other"
    EVICTED_TTL = "evicted_ttl"
    EVICTED_CANCELLED = "evicted_cancelled"
    EVICTED_OTHER = "evicted_other"


# The outcome label values of llm-d's flow control metrics: QueueOutcome.String() in
# llm-d/llm-d-router pkg/epp/flowcontrol/types/outcomes.go, listed in its docs/metrics.md.
# llm-d's RejectedNoEndpoints / EvictedNoEndpoints have no counterpart: a concurrency limit has
# no endpoint list that could be empty.
LLM_D_OUTCOME: dict[Outcome, str] = {
    Outcome.DISPATCHED: "Dispatched",
    Outcome.REJECTED_CAPACITY: "RejectedCapacity",
    Outcome.REJECTED_OTHER: "RejectedOther",
    Outcome.EVICTED_TTL: "EvictedTTL",
    Outcome.EVICTED_CANCELLED: "EvictedContextCancelled",
    Outcome.EVICTED_OTHER: "EvictedOther",
}
# llm-d labels an enqueue that left the request waiting in the queue with this value (processor.go).
LLM_D_NOT_YET_FINALIZED = "NotYetFinalized"


# The status codes the Lua scripts return are part of the Python <-> Lua contract, kept there.
__all__ = ["LLM_D_NOT_YET_FINALIZED", "LLM_D_OUTCOME", "STATUS_OUTCOME", "Outcome", "ScriptStatus"]


STATUS_OUTCOME: dict[int, Outcome] = {
    ScriptStatus.DISPATCHED: Outcome.DISPATCHED,
    ScriptStatus.REJECTED_CAPACITY: Outcome.REJECTED_CAPACITY,
    ScriptStatus.EVICTED_TTL: Outcome.EVICTED_TTL,
    ScriptStatus.EVICTED_CANCELLED: Outcome.EVICTED_CANCELLED,
    ScriptStatus.EVICTED_OTHER: Outcome.EVICTED_OTHER,
    ScriptStatus.REJECTED_OTHER: Outcome.REJECTED_OTHER,
}
