"""The admission API and the gateway check endpoint, under a reserved prefix.

Slots taken here are held outside the sidecar, so they are leases: they expire after ``ticketLease``
unless released or renewed. Routes (all under PREFIX, so they cannot clash with upstream paths):

  POST admit    classification headers as in proxy mode; body optional {"bytes": n, "lease": "30s",
                "tokens": n} (tokens: the caller's estimate, for tokens or hybrid mode)
                200 {"ticket", "outcome", "wait_ms", "lease_ms"} or the outcome's status
  POST release  {"ticket": "..."} -> 200 {"released": bool}
  POST renew    {"ticket": "...", "lease": "30s"} -> 200 {"renewed": true} | 404
                both: 403 bad_ticket (not signed for this pool, sidecar/tickets.py), 503
                store_unavailable (nothing decided; a release is retried by the replica)
  ANY  check[/<original path>]  Envoy ext_authz (HTTP service) and nginx auth_request:
                200 + x-admission-ticket when admitted; otherwise the outcome's status, or
                the status named by the x-admission-deny-status request header (nginx: 401/403)
"""

from __future__ import annotations

import math
from typing import Annotated

import msgspec
from aiohttp import web

from sidecar.controller import Admission
from sidecar.http.classifying import classify_request
from sidecar.http.keys import SERVICE
from sidecar.http.limits import BodyTooLarge, read_capped, too_large
from sidecar.http.outcomes import (
    FAIL_OPEN,
    OUTCOME_HEADER,
    STORE_UNAVAILABLE,
    TICKET_HEADER,
    WAIT_HEADER,
    refusal,
    refused,
    unavailable,
)
from sidecar.outcome import Outcome
from sidecar.service import PASS_THROUGH, AdmissionService, TicketResult
from sidecar.tickets import TicketSigner
from sidecar.units import parse_duration

PREFIX = "/admission/v1"
DENY_STATUS_HEADER = "x-admission-deny-status"
BAD_TICKET = "bad_ticket"
# The API's JSON bodies are a few dozen bytes; server.maxRequestBody is for proxied bodies.
API_BODY_LIMIT = 64 * 1024
TICKETS = web.AppKey("tickets", TicketSigner)


class AdmitBody(msgspec.Struct, forbid_unknown_fields=True):
    # Declared size of the request the caller will forward (counts toward maxBytes): never < 0.
    bytes: Annotated[int, msgspec.Meta(ge=0)] = 0
    lease: str | float | None = None
    # Estimated tokens of the request the caller will forward (concurrency detector, tokens or
    # hybrid mode): the caller estimates, as it holds the body.
    tokens: Annotated[int, msgspec.Meta(ge=0)] = 0


class TicketBody(msgspec.Struct, forbid_unknown_fields=True):
    ticket: str
    lease: str | float | None = None


class Ticket(msgspec.Struct):
    ticket: str
    outcome: str
    wait_ms: int
    lease_ms: int


def _bad_request(message: str) -> web.Response:
    return refusal(Outcome.REJECTED_OTHER.value, "bad_request", 400, message, None)


async def _decode(
    request: web.Request, type_: type[msgspec.Struct]
) -> msgspec.Struct | web.Response:
    if (request.content_length or 0) > API_BODY_LIMIT:
        return too_large(API_BODY_LIMIT)
    try:
        raw = await read_capped(request, API_BODY_LIMIT)  # also caps chunked bodies
    except BodyTooLarge as exc:
        return too_large(exc.limit)
    try:
        return msgspec.json.decode(raw or b"{}", type=type_)
    except msgspec.DecodeError as exc:
        return _bad_request(f"invalid JSON body: {exc}")


def _lease_ms(service: AdmissionService, lease: str | float | None) -> int | web.Response:
    limit = service.config.redis.ticket_lease
    if lease is None:
        return round(limit * 1000)
    try:
        seconds = parse_duration(lease)
    except ValueError as exc:
        return _bad_request(f"lease: {exc}")
    if not 0 < seconds <= limit:
        return _bad_request(f"lease: must be > 0 and at most ticketLease ({limit:g}s)")
    # At least 1 ms: a lease of 0 would make the ticket a slot of the replica, never expiring.
    return max(1, math.ceil(seconds * 1000))


def _json(payload: msgspec.Struct, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=msgspec.json.encode(payload), content_type="application/json"
    )


async def admit(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    body = await _decode(request, AdmitBody)
    if isinstance(body, web.Response):
        return body
    assert isinstance(body, AdmitBody)
    lease_ms = _lease_ms(service, body.lease)
    if isinstance(lease_ms, web.Response):
        return lease_ms
    classified = classify_request(request, service.config, byte_size=body.bytes)
    if isinstance(classified, web.Response):
        return classified
    if body.tokens:
        classified = msgspec.structs.replace(classified, tokens=body.tokens)
    decision = await service.admit(classified, lease_ms=lease_ms)
    if decision is PASS_THROUGH:
        return _json(Ticket("", FAIL_OPEN, 0, 0))
    if not isinstance(decision, Admission) or not decision.admitted:
        return refused(decision)
    ticket = request.app[TICKETS].issue(decision.item_id)
    return _json(Ticket(ticket, decision.outcome.value, decision.wait_ms, lease_ms))


class Released(msgspec.Struct):
    released: bool


class Renewed(msgspec.Struct):
    renewed: bool


async def _ticket_body(request: web.Request) -> tuple[TicketBody, str] | web.Response:
    """The decoded body and the item id its ticket names, or the 400/403/413 to answer."""
    body = await _decode(request, TicketBody)
    if isinstance(body, web.Response):
        return body
    assert isinstance(body, TicketBody)
    item_id = request.app[TICKETS].verify(body.ticket)
    if item_id is None:
        return refusal(
            Outcome.REJECTED_OTHER.value,
            BAD_TICKET,
            403,
            "the ticket was not issued for this pool (forged, malformed, or signed with another "
            "secret)",
            None,
        )
    return body, item_id


def _store_unavailable(what: str) -> web.Response:
    return unavailable(STORE_UNAVAILABLE, f"admission store unavailable: {what} not decided")


async def release(request: web.Request) -> web.Response:
    parsed = await _ticket_body(request)
    if isinstance(parsed, web.Response):
        return parsed
    result = await request.app[SERVICE].release_ticket(parsed[1])
    if result is TicketResult.UNAVAILABLE:
        return _store_unavailable("release (this replica retries it)")
    return _json(Released(result is TicketResult.DONE))


async def renew(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    parsed = await _ticket_body(request)
    if isinstance(parsed, web.Response):
        return parsed
    body, item_id = parsed
    lease_ms = _lease_ms(service, body.lease)
    if isinstance(lease_ms, web.Response):
        return lease_ms
    result = await service.renew_ticket(item_id, lease_ms)
    if result is TicketResult.UNAVAILABLE:
        return _store_unavailable("renew")
    return _json(Renewed(result is TicketResult.DONE), 200 if result is TicketResult.DONE else 404)


async def check(request: web.Request) -> web.Response:
    """ext_authz / auth_request: the verdict is the status; the body is not read."""
    service = request.app[SERVICE]
    classified = classify_request(request, service.config)
    if isinstance(classified, web.Response):
        return _deny(request, classified)
    lease_ms = round(service.config.redis.ticket_lease * 1000)
    decision = await service.admit(classified, lease_ms=lease_ms)
    if decision is PASS_THROUGH:
        return web.Response(status=200, headers={OUTCOME_HEADER: FAIL_OPEN})
    if not isinstance(decision, Admission) or not decision.admitted:
        return _deny(request, refused(decision))
    headers = {
        OUTCOME_HEADER: decision.outcome.value,
        TICKET_HEADER: request.app[TICKETS].issue(decision.item_id),
        WAIT_HEADER: str(decision.wait_ms),
    }
    return web.Response(status=200, headers=headers)


def _deny(request: web.Request, response: web.Response) -> web.Response:
    wanted = request.headers.get(DENY_STATUS_HEADER, "")
    # 4xx only: a refusal is the client's answer, never reported as the sidecar failing.
    if wanted.isdigit() and 400 <= int(wanted) <= 499:
        response.set_status(int(wanted))
    return response


def add_routes(app: web.Application, tickets: TicketSigner) -> None:
    app[TICKETS] = tickets
    app.router.add_post(f"{PREFIX}/admit", admit)
    app.router.add_post(f"{PREFIX}/release", release)
    app.router.add_post(f"{PREFIX}/renew", renew)
    app.router.add_route("*", f"{PREFIX}/check", check)
    app.router.add_route("*", f"{PREFIX}/check/{{tail:.*}}", check)
