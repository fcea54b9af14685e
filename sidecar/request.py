"""The request as the flow controller sees it."""

from __future__ import annotations

import msgspec

from sidecar.workload import DEFAULT_CRITICALITY, WorkloadContext

DEFAULT_FLOW = "default-flow"


class FlowControlRequest(msgspec.Struct, frozen=True):
    """One request to admit. ``workload`` is None for anonymous traffic."""

    request_id: str
    fairness_id: str = DEFAULT_FLOW
    priority: int = 0
    byte_size: int = 0
    pool: str = "default"
    model: str = ""
    target_model: str = ""
    objective: str = ""
    # Time the request may wait in the queue, already capped by the configured maximum.
    ttl_ms: int = 30_000
    workload: WorkloadContext | None = None
    # Estimated tokens (prompt + completion budget; sidecar/tokens.py), charged against the
    # concurrency detector's maxTokenConcurrency in tokens or hybrid mode. 0 = not estimated.
    tokens: int = 0
    # Time-to-first-token objective, ms (x-llm-d-slo-ttft-ms), which slo-deadline ordering
    # orders by. 0 = none.
    slo_ttft_ms: int = 0

    @property
    def workload_id(self) -> str:
        """Escaping happens at the key boundary; an empty id means anonymous."""
        return self.workload.workload_id if self.workload else ""

    @property
    def criticality(self) -> int:
        return self.workload.criticality if self.workload else DEFAULT_CRITICALITY
