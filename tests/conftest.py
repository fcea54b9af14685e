"""Backend matrix: every store test runs on fakeredis and on a real redis-server of its own."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import fakeredis
import pytest
from redis import asyncio as aioredis

from sidecar.config import Config, load_config
from sidecar.store import PoolStore
from sidecar.store.connect import connect
from tests.redis_proc import RedisProcess


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    server = RedisProcess().start()
    yield server
    server.stop()


class Backend:
    """Makes stores (one per replica) that share one pool state."""

    def __init__(self, name: str, make_client: Callable[[], Any]) -> None:
        self.name = name
        self._make_client = make_client
        self.clients: list[Any] = []

    def client(self) -> Any:
        c = self._make_client()
        self.clients.append(c)
        return c

    def store(self, config: Config, replica_id: str = "r1") -> PoolStore:
        return PoolStore(self.client(), config, replica_id, inbox_client=self.client())

    async def close(self) -> None:
        for c in self.clients:
            await c.aclose()


@pytest.fixture(
    params=[
        pytest.param("fake", id="fake"),
        pytest.param("redis", marks=pytest.mark.redis, id="redis"),
    ]
)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "fake":
        server = fakeredis.FakeServer()
        b = Backend("fake", lambda: fakeredis.FakeAsyncRedis(server=server, max_connections=10**6))
    else:
        url = request.getfixturevalue("redis_server").url

        def real_client() -> Any:
            client, inbox = connect(url, timeout_s=5.0)
            b.clients.append(inbox)  # unused here, but a client: closed with the others
            return client

        b = Backend("redis", real_client)
    try:
        if b.name == "redis":
            await b.client().flushall()
        yield b
    finally:
        await b.close()


@pytest.fixture(
    params=[
        pytest.param("embedded", id="embedded"),
        pytest.param("redis", marks=pytest.mark.redis, id="redis"),
    ]
)
async def store_url(request: pytest.FixtureRequest) -> AsyncIterator[str | None]:
    """For HTTP tests: None (the embedded store) or the URL of a flushed real redis-server."""
    if request.param == "embedded":
        yield None
        return
    url: str = request.getfixturevalue("redis_server").url
    client = aioredis.from_url(url)
    try:
        await client.flushall()
    finally:
        await client.aclose()
    yield url


def make_config(limit: int = 1, **overrides: Any) -> Config:
    """A config from a mapping in the YAML's own names, with maxConcurrency = ``limit``."""
    raw: dict[str, Any] = {"saturationDetector": {"parameters": {"maxConcurrency": limit}}}
    raw.update(overrides)
    return load_config(raw)
