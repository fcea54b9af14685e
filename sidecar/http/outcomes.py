"""How outcomes become HTTP responses (DESIGN §6)."""

from __future__ import annotations

import msgspec
from aiohttp import web

from sidecar.lifecycle import Admission
from sidecar.outcome import Outcome
from sidecar.service import SHUTTING_DOWN, STORE_UNAVAILABLE, Refused

__all__ = ["SHUTTING_DOWN", "STORE_UNAVAILABLE", "refusal", "refused", "unavailable"]

OUTCOME_HEADER = "x-admission-outcome"
REASON_HEADER = "x-admission-reason"
WAIT_HEADER = "x-admission-wait-ms"
TICKET_HEADER = "x-admission-ticket"
STATUS_HEADER = "x-admission-status"
# llm-d's header naming why a request was dropped, on every refusal (llm-d/llm-d-router
# pkg/common/error/error.go: RequestDroppedReasonHeaderKey).
DROPPED_REASON_HEADER = "x-llm-d-request-dropped-reason"

# Reasons that are not outcomes of the queue itself (sidecar/service.py decides the others).
FAIL_OPEN = "fail_open"

STATUS = {
    Outcome.REJECTED_CAPACITY: 429,
    Outcome.EVICTED_TTL: 429,
    Outcome.REJECTED_OTHER: 503,
    Outcome.EVICTED_OTHER: 503,
    Outcome.EVICTED_CANCELLED: 499,  # only ever logged: the client is gone
}
RETRY_AFTER_S = {Outcome.REJECTED_CAPACITY: 1, Outcome.EVICTED_TTL: 1, Outcome.EVICTED_OTHER: 1}

# llm-d's values where it has one (error.go RequestDroppedReason*, chosen as in
# pkg/epp/requestcontrol/admission.go translateFlowControlOutcome). llm-d sends none for its
# other and internal outcomes; we still name a reason, "rejected-" + ours, so that every refusal
# says why.
DROPPED_REASON = {
    Outcome.REJECTED_CAPACITY.value: "rejected-saturated",
    Outcome.EVICTED_TTL.value: "rejected-ttl-expired",
    Outcome.EVICTED_CANCELLED.value: "rejected-context-cancelled",
    SHUTTING_DOWN: "rejected-shutting-down",
    Outcome.REJECTED_OTHER.value: "rejected-other",
    Outcome.EVICTED_OTHER.value: "rejected-other",
}


def dropped_reason(reason: str) -> str:
    """The x-llm-d-request-dropped-reason value for one of our reasons."""
    return DROPPED_REASON.get(reason) or "rejected-" + reason.replace("_", "-")


class Refusal(msgspec.Struct):
    outcome: str
    reason: str
    message: str


def refusal(
    outcome: str, reason: str, status: int, message: str, retry_after: int | None
) -> web.Response:
    # The original status travels too: gateways that must remap it (nginx auth_request only
    # passes 401/403) can restore it from this header.
    headers = {
        OUTCOME_HEADER: outcome,
        REASON_HEADER: reason,
        STATUS_HEADER: str(status),
        DROPPED_REASON_HEADER: dropped_reason(reason),
    }
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    body = msgspec.json.encode(Refusal(outcome, reason, message))
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def outcome_response(outcome: Outcome, message: str) -> web.Response:
    return refusal(
        outcome.value, outcome.value, STATUS[outcome], message, RETRY_AFTER_S.get(outcome)
    )


def unavailable(reason: str, message: str) -> web.Response:
    return refusal(Outcome.REJECTED_OTHER.value, reason, 503, message, 1)


def refused(decision: Admission | Refused) -> web.Response:
    """The one mapping from a refusal decided by the service or the queue to its response."""
    if isinstance(decision, Refused):
        return unavailable(decision.reason, decision.message)
    return outcome_response(decision.outcome, f"request {decision.outcome.value}")
