"""The utilization detector end to end: a fake vLLM server's own /metrics gate dispatch.

The server (sidecar/simulator.py) reports its real waiting queue. With 10 waiting (threshold 5)
requests queue; once it reports 0, the queued ones are dispatched by the very call that writes the
sample (lua/sample.lua), measured from the moment that call is sent; when /metrics stops
answering, dispatch stops and the stale_endpoints gauge says why; replicas share one scrape.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import pytest
from prometheus_client import generate_latest

from sidecar.controller import FlowController
from sidecar.http.admin import export_pool_gauges
from sidecar.metrics import Metrics
from sidecar.outcome import Outcome
from sidecar.request import FlowControlRequest
from sidecar.simulator import SimulatedModel, start_app
from sidecar.state import read_state
from sidecar.store import PoolStore
from sidecar.workload import WorkloadContext
from tests.conftest import Backend, make_config
from tests.http_harness import eventually, running_stack

pytestmark = pytest.mark.redis


@pytest.fixture
async def model() -> AsyncIterator[tuple[SimulatedModel, str]]:
    server = SimulatedModel(latency_s=0.01)
    runner, port = await start_app(server.app())
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def redis_backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    from redis.asyncio import Redis

    url = request.getfixturevalue("redis_server").url
    flush = Redis.from_url(url)
    await flush.flushall()
    await flush.aclose()
    backend = Backend("redis", lambda: Redis.from_url(url))
    try:
        yield backend
    finally:
        await backend.close()


def detector_config(url: str) -> Any:
    return make_config(
        saturationDetector={"type": "utilization-detector", "parameters": {"endpoints": [url]}}
    )


class SampleLog:
    """Wraps a store's sample write: when each call was sent, and what it said."""

    def __init__(self, store: PoolStore) -> None:
        self.sent: list[tuple[float, float, int]] = []  # (monotonic, saturation, stale)
        write: Callable[..., Awaitable[Any]] = store.sample

        async def logged(saturation: float, stale: int, endpoints: int, now: Any = None) -> Any:
            self.sent.append((time.monotonic(), saturation, stale))
            return await write(saturation, stale, endpoints, now=now)

        store.sample = logged  # type: ignore[method-assign]

    def first(self, predicate: Callable[[float, int], bool], since: int = 0) -> float | None:
        return next((t for t, s, st in self.sent[since:] if predicate(s, st)), None)


def request(name: str) -> FlowControlRequest:
    return FlowControlRequest(request_id=name, workload=WorkloadContext("w"), ttl_ms=60_000)


async def post_all(session: aiohttp.ClientSession, url: str, n: int) -> list[asyncio.Task[int]]:
    async def one() -> int:
        async with session.post(url + "/v1/completions", json={"prompt": "hi"}) as r:
            await r.read()
            return r.status

    return [asyncio.create_task(one()) for _ in range(n)]


async def gauge(ctrl: FlowController, metrics: Metrics) -> str:
    export_pool_gauges(metrics, await read_state(ctrl.store), ctrl.config)
    return generate_latest(metrics.registry).decode()


async def test_the_servers_waiting_queue_gates_dispatch_and_stale_metrics_fail_closed(
    model: tuple[SimulatedModel, str], redis_backend: Backend
) -> None:
    server, url = model
    server.batch_slots, server.gate = 1, asyncio.Event()
    ctrl = FlowController(redis_backend.store(detector_config(url), "r1"))
    log = SampleLog(ctrl.store)
    metrics = Metrics(pool="default")
    await ctrl.start()
    try:
        async with aiohttp.ClientSession() as session:
            # One request runs (held by the gate), ten wait inside the server: 10 / 5 = 2.
            direct = await post_all(session, url, 11)
            await eventually(lambda: server.waiting == 10)
            await eventually(lambda: log.first(lambda s, st: s >= 1) is not None)
            waiting = asyncio.create_task(ctrl.enqueue_and_wait(request("queued")))
            await eventually(lambda: _queued(ctrl, 1))
            assert not waiting.done()
            # The server drains and reports 0 waiting: the sample that says so dispatches.
            mark = len(log.sent)
            server.gate.set()
            assert await asyncio.gather(*direct) == [200] * 11
            admission = await waiting
            admitted_at = time.monotonic()
            assert admission.outcome is Outcome.DISPATCHED
            freed_at = log.first(lambda s, st: s < 1, since=mark)
            assert freed_at is not None and admitted_at - freed_at < 0.1
            assert await ctrl.release(admission.item_id)
            # /metrics stops answering: the endpoint goes stale, counts as saturated, dispatch
            # stops, and the gauge says why.
            server.metrics_failure = "hang"
            await eventually(lambda: log.first(lambda s, st: st == 1, since=mark) is not None)
            blocked = asyncio.create_task(ctrl.enqueue_and_wait(request("blocked")))
            await eventually(lambda: _queued(ctrl, 1))
            text = await gauge(ctrl, metrics)
            assert (
                'llm_d_epp_flow_control_stale_endpoints{detector="utilization-detector"} 1.0'
                in text
            )
            assert (
                "llm_d_epp_flow_control_pool_saturation"
                '{inference_pool="default",stage="effective"} 1.0' in text
            )
            assert not blocked.done()
            server.restore_metrics()
            assert (await blocked).outcome is Outcome.DISPATCHED
    finally:
        await ctrl.stop()


async def _queued(ctrl: FlowController, n: int) -> bool:
    return (await read_state(ctrl.store)).queued == n


async def test_three_serve_replicas_share_one_scrape_and_another_takes_over(
    model: tuple[SimulatedModel, str], redis_backend: Backend, redis_server: Any
) -> None:
    server, url = model
    config = detector_config(url)
    async with AsyncExitStack() as stack:
        replicas = [
            await stack.enter_async_context(
                running_stack(config, server, redis_server.url, replica_id=f"r{i}")
            )
            for i in range(3)
        ]
        scrapers = [r.server.service.controller.scraper for r in replicas]
        assert all(s is not None for s in scrapers)
        live = [s for s in scrapers if s is not None]
        await eventually(lambda: sum(s.scrapes for s in live) >= 10)
        # One replica at a time scrapes: the server saw the scrapes that one made, but for the
        # one it may have started and not sent yet (a scraper counts a scrape as it begins; the
        # fresh-clone CI of 0f731c4 read 9 at the server beside 10 begun).
        assert sum(1 for s in live if s.scrapes > 0) == 1
        begun = sum(s.scrapes for s in live)
        assert begun - 1 <= server.metrics_scrapes <= begun
        # Every replica admits while the server is idle (the shared sample says so).
        for replica in replicas:
            async with replica.session.post(
                f"{replica.data}/v1/chat/completions", json={"model": "m", "messages": []}
            ) as response:
                assert response.status == 200
        # The scraping replica stops: another takes the lease over within a second.
        holder = next(i for i, s in enumerate(live) if s.scrapes > 0)
        await replicas[holder].server.shutdown()
        others = [s for i, s in enumerate(live) if i != holder]
        before = [s.scrapes for s in others]
        started = time.monotonic()
        await eventually(
            lambda: any(s.scrapes > b for s, b in zip(others, before, strict=True)), 1.0
        )
        assert time.monotonic() - started < 1.0


async def test_through_the_proxy_a_full_server_holds_requests_back_until_a_sample_frees_them(
    model: tuple[SimulatedModel, str], redis_backend: Backend, redis_server: Any
) -> None:
    """The acceptance run as a user sees it: requests through the data port; the time that
    counts is from the sample write to the request's arrival at the model server."""
    server, url = model
    server.batch_slots, server.gate = 1, asyncio.Event()
    async with running_stack(detector_config(url), server, redis_server.url) as stack:
        log = SampleLog(stack.server.service.controller.store)

        async def through_sidecar() -> int:
            async with stack.session.post(
                f"{stack.data}/v1/completions", json={"prompt": "hi"}
            ) as r:
                await r.read()
                return r.status

        async def queued() -> bool:
            return bool((await stack.state())["queued"] == 1)

        async with aiohttp.ClientSession() as direct_session:
            direct = await post_all(direct_session, url, 11)
            await eventually(lambda: server.waiting == 10)
            await eventually(lambda: log.first(lambda s, st: s >= 1) is not None)
            arrived = len(server.arrivals)
            proxied = asyncio.create_task(through_sidecar())
            await eventually(queued)
            assert len(server.arrivals) == arrived  # held back in the sidecar's queue
            mark = len(log.sent)
            server.gate.set()
            assert await asyncio.gather(*direct) == [200] * 11
            assert await proxied == 200
            forwarded_at = server.arrivals[arrived].at
            freed_at = log.first(lambda s, st: s < 1, since=mark)
            assert freed_at is not None and forwarded_at - freed_at < 0.1
            # /metrics stops answering: dispatch stops and the admin port's /metrics says why.
            server.metrics_failure = "hang"
            await eventually(lambda: log.first(lambda s, st: st == 1, since=mark) is not None)
            blocked = asyncio.create_task(through_sidecar())
            await eventually(queued)
            async with stack.session.get(f"{stack.admin}/metrics") as r:
                text = await r.text()
            stale = 'llm_d_epp_flow_control_stale_endpoints{detector="utilization-detector"} 1.0'
            assert stale in text
            assert not blocked.done()
            server.restore_metrics()
            assert await blocked == 200
