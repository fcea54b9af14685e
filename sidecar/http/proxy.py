"""Proxy mode: admit, forward to the upstream with both directions streamed, release at the end.

The slot is released when the response ends, when forwarding fails, and when the client goes away
(aiohttp cancels the handler: the queued request is removed, or the running one's slot freed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import msgspec
from aiohttp import web
from multidict import CIMultiDict

from sidecar.classify import CONTROL_HEADERS
from sidecar.controller import Admission
from sidecar.http.api import PREFIX as API_PREFIX
from sidecar.http.classifying import classify_request
from sidecar.http.keys import SERVICE, SESSION, UPSTREAM
from sidecar.http.limits import BodyTooLarge, capped, oversized, read_capped, too_large
from sidecar.http.outcomes import (
    FAIL_OPEN,
    OUTCOME_HEADER,
    REASON_HEADER,
    WAIT_HEADER,
    refusal,
    refused,
)
from sidecar.outcome import Outcome
from sidecar.request import FlowControlRequest
from sidecar.service import PASS_THROUGH
from sidecar.tokens import TokenEstimator

access_log = logging.getLogger("sidecar.access")
log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
CHUNK = 64 * 1024
# The response's length is set from the upstream's (or left to chunking), never copied as is.
_RESPONSE_DROP = frozenset({"content-length"})


def forwardable(source: Mapping[str, str], drop: frozenset[str]) -> CIMultiDict[str]:
    """Headers minus hop-by-hop ones, those named by Connection, and ``drop``."""
    connection = source.get("connection")
    if connection:
        listed = {h.strip().lower() for h in connection.split(",")}
        drop = drop | listed
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in source.items():
        lower = name.lower()
        if lower not in HOP_BY_HOP and lower not in drop:
            out.add(name, value)
    return out


async def relay(
    request: web.Request,
    session: aiohttp.ClientSession,
    upstream: str,
    headers: Mapping[str, str],
    added: Mapping[str, str],
    max_body: int = 0,
    read: bytes | None = None,
) -> web.StreamResponse:
    """Forwards ``request`` to ``upstream`` and streams the answer back, both ways chunk by chunk.
    ``read``: the body, when it was read already (to estimate its tokens).

    ``added`` headers go onto the response. Raises aiohttp.ClientError or TimeoutError when the
    upstream fails before the response starts (the caller answers 502), UpstreamBroken when it
    fails after (the status line is sent: the caller can only cut the client's connection)."""
    body: Any = read
    if read is None and request.body_exists:
        body = request.content
        if max_body and request.content_length is None:
            # A chunked body: the size middleware could not judge it up front (limits.py).
            body = capped(request.content.iter_chunked(CHUNK), max_body)
    async with session.request(
        request.method,
        upstream + request.rel_url.path_qs,
        headers=headers,
        data=body,
        allow_redirects=False,
        auto_decompress=False,
    ) as upstream_response:
        response = web.StreamResponse(
            status=upstream_response.status, reason=upstream_response.reason
        )
        upstream_headers = upstream_response.headers
        response.headers.extend(forwardable(upstream_headers, _RESPONSE_DROP))
        length = upstream_headers.get("content-length")
        if length is not None and "content-encoding" not in upstream_headers:
            response.content_length = int(length)
        response.headers.update(added)
        await response.prepare(request)
        try:
            async for chunk in upstream_response.content.iter_chunked(CHUNK):
                await response.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamBroken(response, exc) from exc
        await response.write_eof()
    return response


class UpstreamBroken(Exception):
    """The upstream failed after the response to the client had started."""

    def __init__(self, response: web.StreamResponse, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.response = response


ESTIMATOR = TokenEstimator()


# The body limit leaves the admission API's paths to their handlers (sidecar/http/limits.py).
BODY_LIMIT_EXEMPT = f"{API_PREFIX}/"
_DISPATCHED = Outcome.DISPATCHED.value


async def proxy(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    config = service.config
    max_body = config.server.max_request_body
    too_big = oversized(request, max_body, BODY_LIMIT_EXEMPT)
    if too_big is not None:
        return too_big
    started = time.perf_counter()
    classified = classify_request(request, config)
    if isinstance(classified, web.Response):
        _log(request, classified.status, "bad_header", 0, None)
        return classified
    read: bytes | None = None
    if config.counts_tokens and request.body_exists:
        # Tokens or hybrid mode: the body is read first, to estimate its tokens (prompt and
        # max_tokens / max_completion_tokens; sidecar/tokens.py), then forwarded as read.
        try:
            read = await read_capped(request, max_body)
        except BodyTooLarge:
            _log(request, 413, "body_too_large", 0, classified)
            return too_large(max_body)
        classified = msgspec.structs.replace(classified, tokens=ESTIMATOR.total(read))
    try:
        decision = await service.admit(classified)
    except asyncio.CancelledError:
        # The outcome (evicted_cancelled) is counted by the request's lifecycle; only log it.
        wait = time.perf_counter() - started
        _log(request, 499, Outcome.EVICTED_CANCELLED, int(wait * 1000), classified)
        raise
    if decision is PASS_THROUGH:
        admission = None
    elif isinstance(decision, Admission) and decision.admitted:
        admission = decision
    else:
        response = refused(decision)
        wait_ms = decision.wait_ms if isinstance(decision, Admission) else 0
        _log(request, response.status, response.headers[REASON_HEADER], wait_ms, classified)
        return response
    # service.holding() written out: one context manager fewer on every proxied request.
    service.enter_held(admission)
    try:
        return await _forward(request, classified, admission, int(max_body), read)
    finally:
        await service.exit_held(admission)


async def _forward(
    request: web.Request,
    classified: FlowControlRequest,
    admission: Admission | None,
    max_body: int,
    read: bytes | None = None,
) -> web.StreamResponse:
    upstream = request.app[UPSTREAM]
    request_id = classified.request_id
    headers = forwardable(request.headers, CONTROL_HEADERS)
    headers["x-request-id"] = request_id
    if admission is not None:
        outcome, wait_ms = _DISPATCHED, admission.wait_ms
    else:
        outcome, wait_ms = FAIL_OPEN, 0
    added = {OUTCOME_HEADER: outcome, WAIT_HEADER: str(wait_ms), "x-request-id": request_id}
    try:
        response = await relay(
            request, request.app[SESSION], upstream, headers, added, max_body, read
        )
    except UpstreamBroken as exc:
        # A second response written into the body would read as a clean end: cut the connection
        # so the client sees the stream was truncated.
        log.warning("upstream %s failed mid-response: %s", upstream, exc)
        _log(request, exc.response.status, "upstream_broken", wait_ms, classified)
        if request.transport is not None:
            request.transport.abort()
        return exc.response
    except (aiohttp.ClientError, TimeoutError) as exc:
        if isinstance(exc.__cause__, BodyTooLarge):
            _log(request, 413, "body_too_large", wait_ms, classified)
            return too_large(exc.__cause__.limit)
        log.warning("upstream %s failed: %s", upstream, exc)
        _log(request, 502, "upstream_error", wait_ms, classified)
        return refusal(outcome, "upstream_error", 502, f"upstream failed: {exc}", None)
    _log(request, response.status, outcome, wait_ms, classified)
    return response


def _log(
    request: web.Request,
    status: int,
    outcome: str,
    wait_ms: int,
    classified: FlowControlRequest | None,
) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    workload = classified.workload_id or "-" if classified else "-"
    access_log.info(
        "%s %s %s outcome=%s wait_ms=%d workload=%s criticality=%s priority=%s request_id=%s",
        request.method,
        request.rel_url.path,
        status or "-",
        outcome,
        wait_ms,
        workload,
        classified.criticality if classified else "-",
        classified.priority if classified else "-",
        classified.request_id if classified else "-",
    )
