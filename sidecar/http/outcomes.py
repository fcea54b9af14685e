"""How outcomes become HTTP responses (DESIGN §6)."""

from __future__ import annotations

import msgspec
from aiohttp import web

from sidecar.outcome import Outcome

OUTCOME_HEADER = "x-admission-outcome"
REASON_HEADER = "x-admission-reason"
WAIT_HEADER = "x-admission-wait-ms"
TICKET_HEADER = "x-admission-ticket"
STATUS_HEADER = "x-admission-status"

# Reasons that are not outcomes of the queue itself.
SHUTTING_DOWN = "shutting_down"
STORE_UNAVAILABLE = "store_unavailable"
FAIL_OPEN = "fail_open"

STATUS = {
    Outcome.REJECTED_CAPACITY: 429,
    Outcome.EVICTED_TTL: 429,
    Outcome.REJECTED_OTHER: 503,
    Outcome.EVICTED_OTHER: 503,
    Outcome.EVICTED_CANCELLED: 499,  # only ever logged: the client is gone
}
RETRY_AFTER_S = {Outcome.REJECTED_CAPACITY: 1, Outcome.EVICTED_TTL: 1, Outcome.EVICTED_OTHER: 1}


class Refusal(msgspec.Struct):
    outcome: str
    reason: str
    message: str


def refusal(
    outcome: str, reason: str, status: int, message: str, retry_after: int | None
) -> web.Response:
    # The original status travels too: gateways that must remap it (nginx auth_request only
    # passes 401/403) can restore it from this header.
    headers = {OUTCOME_HEADER: outcome, REASON_HEADER: reason, STATUS_HEADER: str(status)}
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
