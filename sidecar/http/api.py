"""The admission API and the gateway check endpoint, under a reserved prefix.

Slots taken here are held outside the sidecar, so they are leases: they expire after ``ticketLease``
unless released or renewed. Routes (all under PREFIX, so they cannot clash with upstream paths):

  POST admit    classification headers as in proxy mode; body optional {"bytes": n, "lease": "30s"}
                200 {"ticket", "outcome", "wait_ms", "lease_ms"} or the outcome's status
  POST release  {"ticket": "..."} -> 200 {"released": bool}
  POST renew    {"ticket": "...", "lease": "30s"} -> 200 {"renewed": true} | 404
  ANY  check[/<original path>]  Envoy ext_authz (HTTP service) and nginx auth_request:
                200 + x-admission-ticket when admitted; otherwise the outcome's status, or
                the status named by the x-admission-deny-status request header (nginx: 401/403)
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from sidecar.controller import Admission
from sidecar.http.classifying import classify_request
from sidecar.http.keys import SERVICE
from sidecar.http.outcomes import (
    FAIL_OPEN,
    OUTCOME_HEADER,
    TICKET_HEADER,
    WAIT_HEADER,
    outcome_response,
    refusal,
)
from sidecar.outcome import Outcome
from sidecar.service import PASS_THROUGH, AdmissionService
from sidecar.units import parse_duration

PREFIX = "/admission/v1"
DENY_STATUS_HEADER = "x-admission-deny-status"


class AdmitBody(msgspec.Struct, forbid_unknown_fields=True):
    bytes: int = 0
    lease: str | float | None = None


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
    raw = await request.read()
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
    return round(seconds * 1000)


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
    decision = await service.admit(classified, lease_ms=lease_ms)
    if isinstance(decision, web.Response):
        return decision
    if decision is PASS_THROUGH:
        return _json(Ticket("", FAIL_OPEN, 0, 0))
    assert isinstance(decision, Admission)
    if not decision.admitted:
        return outcome_response(decision.outcome, f"request {decision.outcome.value}")
    return _json(Ticket(decision.item_id, decision.outcome.value, decision.wait_ms, lease_ms))


class Released(msgspec.Struct):
    released: bool


class Renewed(msgspec.Struct):
    renewed: bool


async def release(request: web.Request) -> web.Response:
    body = await _decode(request, TicketBody)
    if isinstance(body, web.Response):
        return body
    assert isinstance(body, TicketBody)
    return _json(Released(await request.app[SERVICE].release(body.ticket)))


async def renew(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    body = await _decode(request, TicketBody)
    if isinstance(body, web.Response):
        return body
    assert isinstance(body, TicketBody)
    lease_ms = _lease_ms(service, body.lease)
    if isinstance(lease_ms, web.Response):
        return lease_ms
    renewed = await service.controller.renew(body.ticket, lease_ms)
    return _json(Renewed(renewed), 200 if renewed else 404)


async def check(request: web.Request) -> web.Response:
    """ext_authz / auth_request: the verdict is the status; the body is not read."""
    service = request.app[SERVICE]
    classified = classify_request(request, service.config)
    if isinstance(classified, web.Response):
        return _deny(request, classified)
    lease_ms = round(service.config.redis.ticket_lease * 1000)
    decision = await service.admit(classified, lease_ms=lease_ms)
    if isinstance(decision, web.Response):
        return _deny(request, decision)
    if decision is PASS_THROUGH:
        return web.Response(status=200, headers={OUTCOME_HEADER: FAIL_OPEN})
    assert isinstance(decision, Admission)
    if not decision.admitted:
        return _deny(
            request, outcome_response(decision.outcome, f"request {decision.outcome.value}")
        )
    headers = {
        OUTCOME_HEADER: decision.outcome.value,
        TICKET_HEADER: decision.item_id,
        WAIT_HEADER: str(decision.wait_ms),
    }
    return web.Response(status=200, headers=headers)


def _deny(request: web.Request, response: web.Response) -> web.Response:
    wanted = request.headers.get(DENY_STATUS_HEADER, "")
    if wanted.isdigit() and 400 <= int(wanted) <= 599:
        response.set_status(int(wanted))
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_post(f"{PREFIX}/admit", admit)
    app.router.add_post(f"{PREFIX}/release", release)
    app.router.add_post(f"{PREFIX}/renew", renew)
    app.router.add_route("*", f"{PREFIX}/check", check)
    app.router.add_route("*", f"{PREFIX}/check/{{tail:.*}}", check)
