"""Request-body size limits on the data port, enforced before admission.

``oversized`` refuses with 413 a request whose Content-Length exceeds ``server.maxRequestBody``
(0 = unlimited) before it is classified, so an oversized request never takes a queue place. The
handlers that forward a body call it first thing (sidecar/http/proxy.py); it is not a middleware,
which would add a layer to every request. The admission API is exempt: its JSON bodies have their
own, tighter cap (sidecar/http/api.py), and its gateway check never reads a body, while an auth
subrequest may carry the original request's Content-Length (the gateway enforces its own limit
there, e.g. nginx ``client_max_body_size``).

A chunked body has no Content-Length: whoever reads or streams it wraps its chunks in ``capped``,
which raises BodyTooLarge once the limit is passed.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

from aiohttp import web

from sidecar.http.outcomes import refusal
from sidecar.outcome import Outcome

BODY_TOO_LARGE = "body_too_large"


class BodyTooLarge(Exception):
    """A request body went past its limit (bytes)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than {limit} bytes")
        self.limit = limit


def too_large(limit: int) -> web.Response:
    return refusal(
        Outcome.REJECTED_OTHER.value,
        BODY_TOO_LARGE,
        413,
        f"request body larger than {limit} bytes",
        None,
    )


def oversized(request: web.Request, max_body: int, exempt_prefix: str) -> web.Response | None:
    """The 413 for a request whose declared length exceeds ``max_body`` (bytes, 0 = unlimited),
    None when it may go on; paths under ``exempt_prefix`` are left to their handlers."""
    if not max_body:
        return None
    length = request.content_length
    if length is None or length <= max_body or request.path.startswith(exempt_prefix):
        return None
    response = too_large(max_body)
    # Close rather than read and discard the unread body to keep the connection.
    response.force_close()
    return response


async def capped(chunks: AsyncIterable[bytes], limit: int) -> AsyncIterator[bytes]:
    """Yields ``chunks`` unchanged; raises BodyTooLarge once more than ``limit`` bytes went by
    (0 = unlimited). The chunk that crosses the limit is not yielded."""
    seen = 0
    async for chunk in chunks:
        seen += len(chunk)
        if limit and seen > limit:
            raise BodyTooLarge(limit)
        yield chunk


async def read_capped(request: web.Request, limit: int) -> bytes:
    """The whole body of a request, at most ``limit`` bytes (BodyTooLarge beyond)."""
    parts = [chunk async for chunk in capped(request.content.iter_any(), limit)]
    return b"".join(parts)
