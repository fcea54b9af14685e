"""The admin port: /metrics, /healthz, /readyz and /state (JSON view of the pool).

With an admin token configured, /state requires ``Authorization: Bearer <token>``: it names
workloads and replicas. Probes and Prometheus scrapes stay open (they carry no such detail).
"""

from __future__ import annotations

import asyncio
import hmac
import logging

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar import contract
from sidecar.config import Config
from sidecar.http.keys import SERVICE
from sidecar.metrics import Metrics
from sidecar.state import PoolState, read_state

log = logging.getLogger(__name__)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """Ready: not draining, Redis answering within the timeout, and the pool configured in this
    version's Redis layout (docs/upgrading.md)."""
    service = request.app[SERVICE]
    if service.draining:
        return web.Response(status=503, text="shutting down\n")
    store = service.controller.store
    try:
        async with asyncio.timeout(service.config.redis.timeout * 4):
            epoch, note = await store.client.hmget(
                store.key(contract.POOL), "epoch", contract.POOL_LAYOUT
            )
    except Exception as exc:  # timeouts, OSError, redis-py's own hierarchy: all mean not ready
        return web.Response(status=503, text=f"store unreachable: {exc}\n")
    if epoch is None:
        return web.Response(status=503, text="pool not configured yet\n")
    found = None if note is None else _text(note)
    if not contract.layout_is_ours(found):
        return web.Response(
            status=503,
            text=f"pool in another Redis layout ({contract.layout_named(found or '')}), this "
            f"version writes layout {contract.LAYOUT_VERSION}: see docs/upgrading.md\n",
        )
    return web.Response(text="ready\n")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def state(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    try:
        snapshot = await read_state(service.controller.store)
    except Exception as exc:
        return web.Response(status=503, text=f"store unreachable: {exc}\n")
    return web.Response(body=msgspec.json.encode(snapshot), content_type="application/json")


def export_pool_gauges(metrics: Metrics, snapshot: PoolState, config: Config | None = None) -> None:
    """The pool-wide gauges, llm-d's names and their deprecated twins (sidecar/metrics.py).
    Without ``config`` the capacity-utilisation ratios (which divide by its caps) are left out."""
    metrics.export_pool(snapshot, config)


async def metrics_handler(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    try:
        snapshot = await read_state(service.controller.store)
        export_pool_gauges(service.metrics, snapshot, service.config)
    except Exception as exc:  # a scrape still returns the per-replica series
        log.debug("pool gauges unavailable: %s", exc)
    body = generate_latest(service.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def bearer_required(token: bytes, handler: Handler) -> Handler:
    """``handler`` behind ``Authorization: Bearer <token>``, compared in constant time."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        offered = given.strip().encode("utf-8", "replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(offered, token):
            return web.Response(
                status=401,
                text="admin token required\n",
                headers={"WWW-Authenticate": 'Bearer realm="admission-sidecar"'},
            )
        return await handler(request)

    return guarded


def add_routes(app: web.Application, token: bytes | None = None) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/state", state if token is None else bearer_required(token, state))
    app.router.add_get("/metrics", metrics_handler)
