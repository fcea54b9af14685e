"""The reference scenarios through the proxy, over real HTTP, with maxConcurrency 3.

The upstream (a simulated model server) records the order requests reach it; a gate or a count of
permits decides when the requests it holds finish, so each ordering claim rests on events, not on
the machine's speed. The normalisation caps are set to each scenario's scale, as in the engine
tests, and stated in each test. Every test runs on the embedded store and on a real redis-server.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web

from sidecar.config import Config
from sidecar.simulator import SimulatedModel
from tests.conftest import make_config
from tests.http_harness import Stack, eventually, running_stack

LATENCY = 0.2
# The least wait of hist's first requests, and the wait term's cap (maxWaitTimeSeconds).
HISTORY_S = 0.5


def config(max_wait_s: float, max_rate: float) -> Config:
    return make_config(
        limit=3,
        flowControl={
            "defaultPriorityBand": {
                "orderingPolicy": {
                    "type": "workload-aware-ordering-policy",
                    "parameters": {"maxWaitTimeSeconds": max_wait_s, "maxRequestRate": max_rate},
                }
            }
        },
    )


async def call(stack: Stack, name: str, workload: str, criticality: int) -> dict[str, Any]:
    headers = {
        "x-request-id": name,
        "x-workload-id": workload,
        "x-workload-criticality": str(criticality),
    }
    async with stack.session.post(
        f"{stack.data}/v1/chat/completions", json={"max_tokens": 2}, headers=headers
    ) as response:
        await response.read()
        return {
            "name": name,
            "status": response.status,
            "wait_ms": int(response.headers.get("x-admission-wait-ms", "-1")),
        }


def arrivals(model: SimulatedModel) -> list[str]:
    return [a.headers.get("x-request-id", "") for a in model.arrivals]


async def queued(stack: Stack, n: int) -> None:
    async def check() -> bool:
        return int((await stack.state())["queued"]) == n

    await eventually(check)


async def arrived(model: SimulatedModel, n: int) -> None:
    await eventually(lambda: len(model.arrivals) == n)


def gated() -> SimulatedModel:
    model = SimulatedModel(latency_s=LATENCY)
    model.gate = asyncio.Event()
    return model


class Permits:
    """Requests reaching the upstream wait for a permit: the test decides when each finishes."""

    def __init__(self, model: SimulatedModel) -> None:
        self._semaphore = asyncio.Semaphore(0)
        model.on_arrival = self._hold

    async def _hold(self, _arrival: object) -> None:
        await self._semaphore.acquire()

    def grant(self, n: int = 1) -> None:
        for _ in range(n):
            self._semaphore.release()


class HeldStream(SimulatedModel):
    """Streams one chunk, then holds the rest of the stream until ``gate`` is set (running_stack
    sets it when it stops). A request that does not ask to stream is answered at once."""

    async def _held(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        request_id = request.headers.get("x-request-id", "")
        if not body.get("stream"):
            self.finished.append(request_id)
            return web.json_response({"ok": True})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        assert self.gate is not None
        await self.gate.wait()
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        self.finished.append(request_id)
        return response

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._held)
        return app


def held_stream() -> HeldStream:
    model = HeldStream()
    model.gate = asyncio.Event()
    return model


async def test_late_critical_burst_goes_first(store_url: str | None) -> None:
    # Scale: a few requests per workload in a 60 s window -> maxRequestRate 1 req/s; waits of a
    # second or two -> maxWaitTimeSeconds 10.
    model = gated()
    async with running_stack(config(max_wait_s=10, max_rate=1), model, store_url) as stack:
        tasks = [asyncio.create_task(call(stack, f"block-{i}", "blocker", 3)) for i in range(3)]
        await eventually(lambda: len(model.arrivals) == 3)
        for crit, workload in [(1, "batch"), (3, "normal")]:
            tasks += [
                asyncio.create_task(call(stack, f"{workload}-{i}", workload, crit))
                for i in range(4)
            ]
        await queued(stack, 8)
        tasks += [
            asyncio.create_task(call(stack, f"critical-{i}", "critical", 5)) for i in range(4)
        ]
        await queued(stack, 12)
        assert model.gate is not None
        model.gate.set()
        results = await asyncio.gather(*tasks)
    assert all(r["status"] == 200 for r in results)
    order = [n.split("-")[0] for n in arrivals(model)[3:]]
    assert order == ["critical"] * 4 + ["normal"] * 4 + ["batch"] * 4
    assert model.peak <= 3


async def test_steady_workload_interleaves_ahead_of_a_burst(store_url: str | None) -> None:
    # Scale: the burst (24 in a 60 s window, 0.4 req/s) exceeds maxRequestRate 0.3 req/s, the
    # steady workload (6 requests in the window, 0.1 req/s) stays below it; waits are
    # milliseconds against maxWaitTimeSeconds 60, so the rate term decides.
    model = SimulatedModel(latency_s=0)
    permits = Permits(model)
    async with running_stack(config(max_wait_s=60, max_rate=0.3), model, store_url) as stack:
        try:
            burst = [asyncio.create_task(call(stack, f"burst-{i}", "burst", 3)) for i in range(24)]
            await queued(stack, 21)
            steady = []
            for i in range(6):
                steady.append(asyncio.create_task(call(stack, f"steady-{i}", "steady", 3)))
                await queued(stack, 22)
                # One slot frees: the steady request, queued last, goes before 21 burst ones.
                permits.grant()
                await arrived(model, 4 + i)
                assert arrivals(model)[-1] == f"steady-{i}"
        finally:
            permits.grant(30)
        results = await asyncio.gather(*burst, *steady)
    assert all(r["status"] == 200 for r in results)
    burst_waits = sorted(r["wait_ms"] for r in results if r["name"].startswith("burst"))
    steady_waits = [r["wait_ms"] for r in results if r["name"].startswith("steady")]
    # Each steady request waited for one slot; the queued burst requests waited through all six.
    assert max(steady_waits) < burst_waits[len(burst_waits) // 2]
    assert model.peak <= 3


async def test_high_average_wait_overtakes_higher_criticality(store_url: str | None) -> None:
    # Scale: "hist" first waits at least HISTORY_S, so its average wait is at least that ->
    # maxWaitTimeSeconds HISTORY_S, where the wait term is capped (a slower machine only waits
    # longer: the order below does not depend on its speed); a few requests per minute ->
    # maxRequestRate 10 req/s (the rate term stays negligible).
    model = gated()
    cfg = config(max_wait_s=HISTORY_S, max_rate=10)
    async with running_stack(cfg, model, store_url) as stack:
        blockers = [asyncio.create_task(call(stack, f"block-{i}", "blocker", 3)) for i in range(3)]
        await eventually(lambda: len(model.arrivals) == 3)
        history = [asyncio.create_task(call(stack, f"old-{i}", "hist", 3)) for i in range(3)]
        await queued(stack, 3)
        # A duration, not synchronisation: the wait that becomes hist's history.
        await asyncio.sleep(HISTORY_S)
        assert model.gate is not None
        model.gate.set()
        first = await asyncio.gather(*blockers, *history)
        assert min(r["wait_ms"] for r in first if r["name"].startswith("old")) >= HISTORY_S * 1000
        hist = next(w for w in (await stack.state())["workloads"] if w["workload_id"] == "hist")
        assert hist["avg_wait_s"] >= HISTORY_S

        model.gate = asyncio.Event()
        start = len(model.arrivals)
        blockers = [asyncio.create_task(call(stack, f"block2-{i}", "blocker", 3)) for i in range(3)]
        await eventually(lambda: len(model.arrivals) == start + 3)
        tasks = [asyncio.create_task(call(stack, f"fresh-{i}", "fresh", 4)) for i in range(3)]
        await queued(stack, 3)
        tasks += [asyncio.create_task(call(stack, f"hist-{i}", "hist", 3)) for i in range(3)]
        await queued(stack, 6)
        model.gate.set()
        await asyncio.gather(*blockers, *tasks)
    order = [n.split("-")[0] for n in arrivals(model)[start + 3 :]]
    assert order == ["hist"] * 3 + ["fresh"] * 3


async def test_all_requests_get_a_response_under_load(store_url: str | None) -> None:
    model = SimulatedModel(latency_s=0.02)
    async with running_stack(make_config(limit=3), model, store_url) as stack:
        results = await asyncio.gather(
            *(call(stack, f"r-{i}", f"w{i % 5}", 1 + i % 5) for i in range(60))
        )
    assert [r["status"] for r in results] == [200] * 60
    assert model.peak <= 3


async def test_streaming_delivers_first_chunk_before_upstream_finishes(
    store_url: str | None,
) -> None:
    model = held_stream()
    async with running_stack(make_config(limit=2), model, store_url) as stack:
        async with stack.session.post(
            f"{stack.data}/v1/chat/completions",
            json={"stream": True, "max_tokens": 5},
            headers={"x-request-id": "stream-1"},
        ) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            # Bounded: a proxy that buffered the body would never deliver this chunk while the
            # upstream holds the rest of the stream.
            async with asyncio.timeout(30):
                first = await response.content.readuntil(b"\n\n")
            assert first == b"data: first\n\n"
            assert "stream-1" not in model.finished  # held upstream: the chunk was not buffered
            assert model.gate is not None
            model.gate.set()
            rest = await response.read()
        assert rest.endswith(b"data: [DONE]\n\n")
        assert "stream-1" in model.finished


async def test_client_disconnect_while_queued_frees_its_place(store_url: str | None) -> None:
    model = gated()
    async with running_stack(make_config(limit=1), model, store_url) as stack:
        holder = asyncio.create_task(call(stack, "holder", "a", 3))
        await eventually(lambda: len(model.arrivals) == 1)
        # A client that gives up while queued: its own session, closed mid-request.
        async with aiohttp.ClientSession() as quitter:
            gone = asyncio.create_task(
                quitter.post(f"{stack.data}/v1/x", headers={"x-request-id": "gone"})
            )
            await queued(stack, 1)
            gone.cancel()
        await queued(stack, 0)  # the sidecar saw the disconnect and removed the request
        nxt = asyncio.create_task(call(stack, "next", "b", 3))
        await queued(stack, 1)
        assert model.gate is not None
        model.gate.set()
        assert (await holder)["status"] == 200
        assert (await nxt)["status"] == 200
        state = await stack.state()
    assert "gone" not in arrivals(model)
    assert arrivals(model) == ["holder", "next"]
    assert state["inflight"] == 0


async def test_client_disconnect_while_streaming_releases_the_slot(
    store_url: str | None,
) -> None:
    model = held_stream()  # the stream never ends on its own
    async with running_stack(make_config(limit=1), model, store_url) as stack:
        quitter = aiohttp.ClientSession()
        try:
            response = await quitter.post(
                f"{stack.data}/v1/chat/completions", json={"stream": True, "max_tokens": 20}
            )
            try:
                await response.content.readuntil(b"\n\n")
            finally:
                response.close()  # gone mid-stream: the connection is dropped, not pooled
        finally:
            await quitter.close()

        async def released() -> bool:
            return int((await stack.state())["inflight"]) == 0

        await eventually(released)
        assert (await call(stack, "after", "a", 3))["status"] == 200
        assert "after" in model.finished


async def test_control_headers_are_stripped_upstream(store_url: str | None) -> None:
    model = SimulatedModel(latency_s=0.0)
    async with running_stack(make_config(limit=2), model, store_url) as stack:
        headers = {
            "x-workload-id": "w",
            "x-workload-criticality": "4",
            "x-workload-context": '{"workload_id": "w", "criticality": 4}',
            "x-gateway-inference-fairness-id": "f",
            "x-gateway-inference-objective": "premium",
            "x-gateway-inference-ttl": "5s",
            "x-request-id": "keep-me",
            "authorization": "Bearer abc",
        }
        async with stack.session.get(f"{stack.data}/v1/models", headers=headers) as r:
            assert r.status == 200
            assert r.headers["x-admission-outcome"] == "dispatched"
            assert r.headers["x-request-id"] == "keep-me"
    seen = set(model.arrivals[0].headers)
    assert not seen & {k for k in headers if k.startswith(("x-workload", "x-gateway"))}
    assert {"x-request-id", "authorization"} <= seen
