"""Turns an HTTP request into a FlowControlRequest, or a 400 that names the bad header."""

from __future__ import annotations

from aiohttp import web

from sidecar.classify import HeaderError, classify
from sidecar.config import Config
from sidecar.http.outcomes import refusal
from sidecar.outcome import Outcome
from sidecar.request import FlowControlRequest


def classify_request(
    request: web.Request, config: Config, byte_size: int | None = None
) -> FlowControlRequest | web.Response:
    fc = config.flow_control
    try:
        return classify(
            request.headers,
            pool=config.pool,
            objectives=config.objectives,
            default_ttl_ms=round(fc.default_request_ttl * 1000),
            max_ttl_ms=round(fc.max_request_ttl * 1000),
            strict=config.strict_headers,
            byte_size=(request.content_length or 0) if byte_size is None else byte_size,
        )
    except HeaderError as exc:
        return refusal(Outcome.REJECTED_OTHER.value, "bad_header", 400, str(exc), None)
