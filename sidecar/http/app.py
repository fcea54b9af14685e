"""Builds the two aiohttp applications and runs them with a graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from sidecar.breaker import CircuitBreaker
from sidecar.config import Config
from sidecar.controller import Admission, FlowController
from sidecar.errors import LayoutMismatchError, StoreError
from sidecar.http import admin, api
from sidecar.http.keys import SERVICE, SESSION, UPSTREAM
from sidecar.http.limits import oversized
from sidecar.http.outcomes import refusal
from sidecar.http.proxy import BODY_LIMIT_EXEMPT, proxy
from sidecar.metrics import Metrics
from sidecar.options import ServeOptions
from sidecar.outcome import Outcome
from sidecar.request import FlowControlRequest
from sidecar.service import AdmissionService
from sidecar.store import PoolStore
from sidecar.store.connect import connect, embedded, mask_url
from sidecar.tickets import TicketSigner, ticket_signer

log = logging.getLogger(__name__)


def build_service(config: Config, redis_url: str | None, replica_id: str) -> AdmissionService:
    metrics = Metrics(config.pool)
    if redis_url:
        client, inbox = connect(redis_url, config.redis.timeout, config.redis.max_connections)
    else:
        client, inbox = embedded()
    store = PoolStore(client, config, replica_id, inbox_client=inbox, timer=metrics.time_script)

    def on_outcome(request: FlowControlRequest, admission: Admission) -> None:
        metrics.record_outcome(
            admission.outcome, request.priority, request.fairness_id, admission.wait_ms / 1000
        )

    def on_enqueued(request: FlowControlRequest, outcome: Outcome | None, seconds: float) -> None:
        metrics.record_enqueue(outcome, request.priority, request.fairness_id, seconds)

    controller = FlowController(store, on_outcome=on_outcome, on_enqueued=on_enqueued)
    breaker = CircuitBreaker(cooldown_s=max(config.redis.timeout * 4, 0.5))
    return AdmissionService(config, controller, metrics, breaker)


async def _no_upstream(request: web.Request) -> web.Response:
    too_big = oversized(
        request, request.app[SERVICE].config.server.max_request_body, BODY_LIMIT_EXEMPT
    )
    if too_big is not None:
        return too_big
    return refusal(
        Outcome.REJECTED_OTHER.value, "no_upstream", 502, "no --upstream configured", None
    )


async def upstream_session(app: web.Application) -> AsyncIterator[None]:
    """The client session to the upstream, for an app's cleanup_ctx (also the bench's baseline)."""
    # No total timeout: a streamed completion may take minutes. Connect is bounded.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=60)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=connector, auto_decompress=False
    ) as session:
        app[SESSION] = session
        yield


def data_app(
    service: AdmissionService, upstream: str | None, tickets: TicketSigner | None = None
) -> web.Application:
    """``tickets`` None: signed with a per-process secret (sidecar/tickets.py warns).

    No middlewares: each would wrap every proxied request; the handlers that forward a body
    enforce ``server.maxRequestBody`` themselves (sidecar/http/limits.py ``oversized``)."""
    app = web.Application(client_max_size=1024**3)
    app[SERVICE] = service
    api.add_routes(app, tickets or ticket_signer(None, service.config.pool))
    if upstream:
        app[UPSTREAM] = upstream.rstrip("/")
        app.cleanup_ctx.append(upstream_session)
        app.router.add_route("*", "/{tail:.*}", proxy)
    else:
        app.router.add_route("*", "/{tail:.*}", _no_upstream)
    return app


def admin_app(service: AdmissionService, token: bytes | None = None) -> web.Application:
    """``token``: the bearer token /state requires (None: open)."""
    app = web.Application()
    app[SERVICE] = service
    admin.add_routes(app, token)
    return app


async def start_service(service: AdmissionService) -> None:
    """Configures the pool and starts the replica's loops; tolerates Redis being down at start."""
    try:
        await service.controller.start()
    except LayoutMismatchError as exc:
        # Not ready, and retrying: once the other version's pool is gone, this replica starts.
        log.error("%s; not ready, will keep trying", exc)
        service.controller.start_loops()
        return
    except StoreError as exc:
        log.warning("Redis unavailable at start (%s); will keep trying", exc)
        service.controller.start_loops()
        return
    await log_store_facts(service.controller.store.client)


async def log_store_facts(client: object) -> None:
    """One start-up line with the Redis version and eviction policy: queues must not be evicted."""
    try:
        info = await client.info("server")  # type: ignore[attr-defined]
        policy = (await client.config_get("maxmemory-policy")).get("maxmemory-policy", "?")  # type: ignore[attr-defined]
    except Exception as exc:  # managed services may forbid CONFIG; the sidecar works regardless
        log.info("store facts unavailable: %s", exc)
        return
    log.info("store: redis %s, maxmemory-policy %s", info.get("redis_version", "?"), policy)
    if policy not in ("noeviction", "?"):
        log.warning(
            "maxmemory-policy is %s: Redis may evict queue keys under memory pressure; "
            "use noeviction for the pool's Redis",
            policy,
        )


async def stop_service(service: AdmissionService) -> None:
    store = service.controller.store
    try:
        await service.controller.stop(deregister=True)
    finally:
        # Closed however stopping ended (a loop that died re-raises here): an unclosed client
        # leaves its connections open until the garbage collector finds them.
        try:
            await store.client.aclose()
        finally:
            if store.inbox_client is not store.client:
                await store.inbox_client.aclose()


class Server:
    """Both ports of one replica; ``run`` serves until SIGTERM/SIGINT, then drains."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.service = build_service(options.config, options.redis_url, options.replica_id)
        secret = options.ticket_secret.reveal() if options.ticket_secret else None
        self.tickets = ticket_signer(secret, options.config.pool)
        self._runners: list[web.AppRunner] = []
        self._stop = asyncio.Event()

    async def start(self) -> None:
        await start_service(self.service)
        apps = [
            (data_app(self.service, self.options.upstream, self.tickets), self.options.listen),
            (admin_app(self.service, self._admin_token()), self.options.admin_listen),
        ]
        for app, (host, port) in apps:
            # handler_cancellation: a client that disconnects cancels its handler, which removes
            # its queued request or frees its slot.
            runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, host, port, reuse_address=True).start()
            self._runners.append(runner)
        cfg = self.options.config
        log.info(
            "serving pool %s on %s:%d (admin %s:%d) as replica %s; store %s; upstream %s; %s",
            cfg.pool,
            *self.options.listen,
            *self.options.admin_listen,
            self.options.replica_id,
            mask_url(self.options.redis_url) if self.options.redis_url else "embedded",
            self.options.upstream or "-",
            _detector(cfg),
        )

    def _admin_token(self) -> bytes | None:
        token = self.options.admin_token
        return token.reveal() if token is not None else None

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self.start()
        await self._stop.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        grace = self.options.config.server.shutdown_grace_period
        log.info("shutting down: not ready, draining for up to %.0fs", grace)
        drained = await self.service.drain(grace)
        for runner in self._runners:
            await runner.cleanup()
        await stop_service(self.service)
        log.info("stopped (%s)", "drained" if drained else "grace period exceeded")


def _detector(cfg: Config) -> str:
    """The saturation detector, as the startup line names it."""
    if cfg.utilization:
        return "utilization-detector"
    limits = [f"{cfg.request_limit} requests" if cfg.request_limit else ""]
    limits.append(f"{cfg.token_limit} tokens" if cfg.token_limit else "")
    return "limit " + " and ".join(x for x in limits if x)
