"""The admin port: /metrics, /healthz, /readyz and /state (JSON view of the pool)."""

from __future__ import annotations

import asyncio
import logging

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar.http.keys import SERVICE
from sidecar.metrics import Metrics
from sidecar.state import PoolState, read_state

log = logging.getLogger(__name__)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """Ready: not draining, Redis answering within the timeout, and the pool configured."""
    service = request.app[SERVICE]
    if service.draining:
        return web.Response(status=503, text="shutting down\n")
    store = service.controller.store
    try:
        async with asyncio.timeout(service.config.redis.timeout * 4):
            configured = await store.client.hexists(store.key("cfg"), "epoch")
    except Exception as exc:  # timeouts, OSError, redis-py's own hierarchy: all mean not ready
        return web.Response(status=503, text=f"store unreachable: {exc}\n")
    if not configured:
        return web.Response(status=503, text="pool not configured yet\n")
    return web.Response(text="ready\n")


async def state(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    try:
        snapshot = await read_state(service.controller.store)
    except Exception as exc:
        return web.Response(status=503, text=f"store unreachable: {exc}\n")
    return web.Response(body=msgspec.json.encode(snapshot), content_type="application/json")


def export_pool_gauges(metrics: Metrics, snapshot: PoolState) -> None:
    pool = metrics.pool
    metrics.saturation.labels(pool).set(snapshot.saturation)
    metrics.inflight.labels(pool).set(snapshot.inflight)
    metrics.queue_size.clear()
    metrics.queue_bytes.clear()
    for band in snapshot.bands:
        metrics.queue_bytes.labels(str(band.priority), pool).set(band.queued_bytes)
        for flow in band.flows:
            label = metrics.flow_label(flow.flow)
            metrics.queue_size.labels(label, str(band.priority), pool).inc(flow.queued)
    for gauge in (metrics.workload_rate, metrics.workload_wait, metrics.workload_active):
        gauge.clear()
    for w in snapshot.workloads:
        label = metrics.workload_label(w.workload_id)
        metrics.workload_rate.labels(label, pool).inc(w.request_rate)
        metrics.workload_wait.labels(label, pool).set(w.avg_wait_s)
        metrics.workload_active.labels(label, pool).inc(w.active)


async def metrics_handler(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    try:
        export_pool_gauges(service.metrics, await read_state(service.controller.store))
    except Exception as exc:  # a scrape still returns the per-replica series
        log.debug("pool gauges unavailable: %s", exc)
    body = generate_latest(service.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/state", state)
    app.router.add_get("/metrics", metrics_handler)
