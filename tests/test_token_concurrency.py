"""The concurrency detector in tokens and hybrid mode, across three replicas on one Redis.

Each proxied request's tokens are estimated from its body (sidecar/tokens.py: the prompt, and
max_tokens / max_completion_tokens), charged at dispatch and returned at release, in Redis, so
the sum of estimated tokens in flight at the upstream (the simulator estimates with the same
estimator) never passes maxTokenConcurrency, whichever replica admitted them.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis

from sidecar.simulator import SimulatedModel
from sidecar.tokens import TokenEstimator
from tests.conftest import make_config
from tests.http_harness import running_stack

pytestmark = pytest.mark.redis

TOKEN_LIMIT = 3_000


def body(rng: random.Random) -> dict[str, Any]:
    words = " ".join("word" for _ in range(rng.randint(10, 400)))
    return {
        "model": "m",
        "messages": [{"role": "user", "content": words}],
        "max_tokens": rng.randint(100, 900),
    }


@pytest.mark.parametrize("mode", ["tokens", "hybrid"])
async def test_estimated_tokens_in_flight_never_pass_the_limit_across_three_replicas(
    redis_server: Any, mode: str
) -> None:
    flush = Redis.from_url(redis_server.url)
    await flush.flushall()
    await flush.aclose()
    parameters: dict[str, Any] = {"concurrencyMode": mode, "maxTokenConcurrency": TOKEN_LIMIT}
    if mode == "hybrid":
        parameters["maxConcurrency"] = 3
    config = make_config(
        saturationDetector={"type": "concurrency-detector", "parameters": parameters}
    )
    model = SimulatedModel(latency_s=0.05)
    rng = random.Random(7)
    bodies = [body(rng) for _ in range(36)]
    estimate = TokenEstimator()
    assert all(estimate.total(msgspec.json.encode(b)) < TOKEN_LIMIT for b in bodies)
    async with AsyncExitStack() as stack:
        replicas = [
            await stack.enter_async_context(
                running_stack(config, model, redis_server.url, replica_id=f"r{i}")
            )
            for i in range(3)
        ]

        async def send(i: int, payload: dict[str, Any]) -> int:
            replica = replicas[i % 3]
            url = f"{replica.data}/v1/chat/completions"
            async with replica.session.post(url, json=payload) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(send(i, b) for i, b in enumerate(bodies)))
    assert statuses == [200] * len(bodies)
    assert model.tokens_in_flight == 0
    # Held to the budget, and the budget was used (more than one request at a time).
    assert TOKEN_LIMIT // 2 < model.peak_tokens <= TOKEN_LIMIT
    if mode == "hybrid":
        assert model.peak <= 3


async def test_a_chunked_body_past_the_limit_is_refused_before_its_tokens_are_estimated() -> None:
    config = make_config(
        server={"maxRequestBody": "1Ki"},
        saturationDetector={
            "parameters": {"concurrencyMode": "tokens", "maxTokenConcurrency": TOKEN_LIMIT}
        },
    )
    model = SimulatedModel(latency_s=0)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * 512

    async with (
        running_stack(config, model) as replica,
        replica.session.post(f"{replica.data}/v1/completions", data=chunks()) as r,
    ):
        assert r.status == 413
    assert model.arrivals == []
