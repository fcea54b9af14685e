"""Proxy mode under the faults a gateway really sees, on the embedded store and on a real Redis.

- clients that close the connection after every response (HTTP/1.0, ``Connection: close``, nginx's
  default upstream) cancel their handler while its release is on the wire: the release's reply
  must still wake the requests it dispatched (issue 7, defect 1);
- an upstream that dies mid-stream: the client connection is cut, never a second response written
  into the body (defect 6), and the slot is released.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest

from sidecar.simulator import SimulatedModel
from tests.conftest import make_config
from tests.http_harness import Stack, eventually, running_stack
from tests.redis_proc import RedisProcess


@pytest.fixture(
    params=[
        pytest.param("embedded", id="embedded"),
        pytest.param("redis", marks=pytest.mark.redis, id="redis"),
    ]
)
def store_url(request: pytest.FixtureRequest) -> str | None:
    if request.param == "embedded":
        return None
    server: RedisProcess = request.getfixturevalue("redis_server")
    return server.url


@asynccontextmanager
async def stack_for(url: str | None, model: SimulatedModel, limit: int) -> AsyncIterator[Stack]:
    config = make_config(limit=limit, pool=f"faults{id(model)}")
    async with running_stack(config, model, redis_url=url) as stack:
        yield stack


async def test_connection_close_clients_keep_the_pool_busy(store_url: str | None) -> None:
    model = SimulatedModel(latency_s=0.05)
    async with stack_for(store_url, model, limit=4) as stack:
        statuses: list[int] = []

        async def client(n: int) -> None:
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=connector) as session:
                for i in range(3):
                    headers = {"x-request-id": f"c{n}-{i}", "x-gateway-inference-ttl": "20s"}
                    async with session.post(
                        f"{stack.data}/v1/chat/completions", json={}, headers=headers
                    ) as response:
                        await response.read()
                        statuses.append(response.status)

        # 16 clients over 4 slots: most requests queue, and each release is cancelled by its
        # client's close. A lost wake-up leaves its request waiting out its 20 s TTL (429), and
        # the test's own timeout fails long before.
        await asyncio.wait_for(asyncio.gather(*(client(n) for n in range(16))), 60)
        assert statuses == [200] * 48
        assert model.peak <= 4

        async def drained() -> bool:
            state = await stack.state()
            return int(state["inflight"]) == 0 and int(state["queued"]) == 0

        await eventually(drained)


async def test_upstream_dying_mid_stream_cuts_the_client_connection(store_url: str | None) -> None:
    model = SimulatedModel(latency_s=0, token_delay_s=0, fail_after_chunks=2)
    async with stack_for(store_url, model, limit=1) as stack:
        body = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async with stack.session.post(
                f"{stack.data}/v1/chat/completions", json={"stream": True, "max_tokens": 8}
            ) as response:
                assert response.status == 200
                async for chunk in response.content.iter_any():
                    body += chunk
        assert b"t1 " in body  # what the upstream sent did arrive
        assert b"upstream_error" not in body and b"[DONE]" not in body

        async def released() -> bool:
            return int((await stack.state())["inflight"]) == 0

        await eventually(released)
        # The only slot is free again: the next request goes through.
        model.fail_after_chunks = None
        async with stack.session.post(
            f"{stack.data}/v1/chat/completions", json={"stream": True, "max_tokens": 2}
        ) as response:
            assert response.status == 200
            assert b"[DONE]" in await response.read()


async def test_a_chunked_body_past_the_limit_gets_413(store_url: str | None) -> None:
    model = SimulatedModel(latency_s=0)
    config = make_config(limit=1, pool="chunked", server={"maxRequestBody": "1Ki"})
    async with running_stack(config, model, redis_url=store_url) as stack:

        async def body() -> AsyncIterator[bytes]:
            for _ in range(8):
                yield b"x" * 512  # no Content-Length: sent chunked, judged while forwarded

        async with stack.session.post(f"{stack.data}/v1/echo", data=body()) as response:
            assert response.status == 413
            assert response.headers["x-admission-reason"] == "body_too_large"

        async def released() -> bool:
            return int((await stack.state())["inflight"]) == 0

        await eventually(released)
