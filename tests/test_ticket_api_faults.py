"""Ticket release and renew while Redis refuses the sidecar: 503 store_unavailable, never 500/200.

The fault keeps Redis's data: the sidecar connects as Redis's ``default`` user, which the test
disables (and disconnects) through an ``admin`` user of its own, then enables again. So a release
that failed cannot have run anyway, and only the replica's retry can free the slot afterwards.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from redis import asyncio as aioredis

from tests.conftest import make_config
from tests.http_harness import Stack, eventually, running_stack
from tests.redis_proc import RedisProcess

pytestmark = pytest.mark.redis
API = "/admission/v1"


class Outage:
    """Turns Redis away from the sidecar (the ``default`` user) and back, keeping its data."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.admin: Any = None

    async def __aenter__(self) -> Outage:
        setup = aioredis.Redis(port=self.port)
        await setup.acl_setuser(
            "admin", enabled=True, passwords=["+admin-pw"], keys=["*"], commands=["+@all"]
        )
        await setup.aclose()
        self.admin = aioredis.Redis(port=self.port, username="admin", password="admin-pw")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.admin.aclose()

    async def begin(self) -> None:
        await self.admin.execute_command("ACL", "SETUSER", "default", "off")
        await self.admin.execute_command("CLIENT", "KILL", "USER", "default")

    async def end(self) -> None:
        await self.admin.execute_command("ACL", "SETUSER", "default", "on")


@pytest.fixture
def redis() -> Iterator[RedisProcess]:
    server = RedisProcess().start()
    yield server
    server.kill()


# Background loops that touch the store rarely: during the outage only the requests call it, so
# the breaker counts exactly their failures.
QUIET = {"heartbeatInterval": "30s", "maintenanceInterval": "30s", "leaseTimeout": "60s"}


@asynccontextmanager
async def stack_and_outage(
    redis: RedisProcess, **redis_config: str
) -> AsyncIterator[tuple[Stack, Outage]]:
    cfg = make_config(limit=1, redis={"timeout": "250ms", **redis_config})
    async with running_stack(cfg, redis_url=redis.url) as stack, Outage(redis.port) as outage:
        yield stack, outage


async def admit(stack: Stack) -> str:
    async with stack.session.post(f"{stack.data}{API}/admit") as r:
        assert r.status == 200
        ticket: str = (await r.json())["ticket"]
        return ticket


async def post(stack: Stack, route: str, ticket: str) -> aiohttp.ClientResponse:
    async with stack.session.post(f"{stack.data}{API}/{route}", json={"ticket": ticket}) as r:
        await r.read()
        return r


async def assert_store_unavailable(response: aiohttp.ClientResponse) -> None:
    assert response.status == 503
    assert response.headers["x-admission-outcome"] == "rejected_other"
    assert response.headers["x-admission-reason"] == "store_unavailable"
    assert response.headers["Retry-After"] == "1"
    body = await response.json()
    assert (body["outcome"], body["reason"]) == ("rejected_other", "store_unavailable")


@pytest.mark.parametrize("route", ["renew", "release"])
async def test_while_redis_refuses_it_is_503_and_counts_in_the_breaker(
    redis: RedisProcess, route: str
) -> None:
    async with stack_and_outage(redis, **QUIET) as (stack, outage):
        ticket = await admit(stack)
        breaker = stack.server.service.breaker
        await outage.begin()
        for _ in range(breaker.threshold):
            assert not breaker.is_open
            await assert_store_unavailable(await post(stack, route, ticket))
        assert breaker.is_open  # each failed call was one store failure
        await assert_store_unavailable(await post(stack, route, ticket))
        await outage.end()

        async def answered() -> bool:
            return (await post(stack, route, ticket)).status == 200

        await eventually(answered)
        assert not breaker.is_open


async def test_a_release_that_failed_is_retried_by_the_replica(redis: RedisProcess) -> None:
    async with stack_and_outage(redis, heartbeatInterval="200ms") as (stack, outage):
        ticket = await admit(stack)
        assert (await stack.state())["inflight"] == 1
        await outage.begin()
        await assert_store_unavailable(await post(stack, "release", ticket))
        await outage.end()

        async def freed() -> bool:
            return bool((await stack.state())["inflight"] == 0)

        # Nobody calls release again, the failed call cannot have run (Redis refused the user),
        # and the lease (ticketLease 60s) outlasts the wait: only the heartbeat's retry frees it.
        await eventually(freed)
        again = await post(stack, "release", ticket)
        assert again.status == 200 and await again.json() == {"released": False}
