"""Faults: Redis down, Redis restarted empty, script cache flushed, a replica SIGKILLed."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sidecar.controller import FlowController
from sidecar.errors import StoreError
from sidecar.outcome import Outcome
from sidecar.request import FlowControlRequest
from sidecar.store import PoolStore
from sidecar.store.connect import connect
from tests.conftest import make_config
from tests.redis_proc import RedisProcess

pytestmark = pytest.mark.redis
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    """A server this test may kill and restart."""
    server = RedisProcess().start()
    yield server
    server.kill()


@pytest.fixture
async def controllers(own_redis: RedisProcess) -> AsyncIterator[list[FlowController]]:
    made: list[FlowController] = []
    yield made
    for ctrl in made:
        await ctrl.stop()
        await ctrl.store.client.aclose()
        await ctrl.store.inbox_client.aclose()


def controller(
    server: RedisProcess, made: list[FlowController], replica: str, limit: int = 1
) -> FlowController:
    cfg = make_config(
        limit=limit,
        redis={
            "timeout": "200ms",
            "leaseTimeout": "1s",
            "heartbeatInterval": "100ms",
            "maintenanceInterval": "100ms",
        },
    )
    client, inbox = connect(server.url, timeout_s=0.2)
    ctrl = FlowController(PoolStore(client, cfg, replica, inbox_client=inbox))
    made.append(ctrl)
    return ctrl


async def test_redis_down_raises_store_error_within_the_timeout(
    own_redis: RedisProcess, controllers: list[FlowController]
) -> None:
    ctrl = controller(own_redis, controllers, "a")
    await ctrl.start(loops=False)
    own_redis.kill()
    async with asyncio.timeout(5):  # guards against a hang; the call gives up after ~0.2 s
        with pytest.raises(StoreError):
            await ctrl.enqueue_and_wait(FlowControlRequest(request_id="x"))


async def test_redis_restart_reconfigures_and_reregisters(
    own_redis: RedisProcess, controllers: list[FlowController]
) -> None:
    ctrl = controller(own_redis, controllers, "a")
    await ctrl.start(loops=False)
    held = await ctrl.enqueue_and_wait(FlowControlRequest(request_id="held"))
    waiting = await ctrl.submit(FlowControlRequest(request_id="waiting", ttl_ms=30_000))
    result = asyncio.create_task(waiting.result())
    own_redis.restart()  # empty: no config, no queue, no in-flight count
    await ctrl.heartbeat()  # reconnects, rewrites the config, learns it was forgotten
    stats = await ctrl.store.client.hgetall(ctrl.store.key("pool"))
    # The held slot is counted again and the waiter took a new place in the queue.
    assert int(stats[b"inflight"]) == 1
    assert int(stats[b"qn"]) == 1
    assert not result.done()
    # Dispatch resumes when the recovery hold ends, at a maintenance tick of the loops.
    ctrl.start_loops()
    await ctrl.release(held.item_id)
    admission = await result
    assert admission.outcome is Outcome.DISPATCHED
    await ctrl.release(admission.item_id)
    assert int(await ctrl.store.client.hget(ctrl.store.key("pool"), "inflight")) == 0


async def test_flushed_script_cache_recovers(
    own_redis: RedisProcess, controllers: list[FlowController]
) -> None:
    ctrl = controller(own_redis, controllers, "a")
    await ctrl.start(loops=False)
    await ctrl.store.client.script_flush()
    admission = await ctrl.enqueue_and_wait(FlowControlRequest(request_id="x"))
    assert admission.admitted
    assert await ctrl.release(admission.item_id)


async def test_killed_replica_is_reclaimed_by_the_others(
    own_redis: RedisProcess, controllers: list[FlowController]
) -> None:
    doomed = subprocess.Popen(
        [sys.executable, "-m", "tests.replica_proc", own_redis.url, "2"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert doomed.stdout is not None
        line = await asyncio.to_thread(doomed.stdout.readline)
        assert line.strip() == "ready"
        survivor = controller(own_redis, controllers, "survivor", limit=2)
        await survivor.start()
        stats = await survivor.store.client.hgetall(survivor.store.key("pool"))
        assert (int(stats[b"inflight"]), int(stats[b"qn"])) == (2, 1)
        doomed.kill()
        doomed.wait()
        # The pool is full until the dead replica's lease (1 s) runs out and maintenance reclaims.
        async with asyncio.timeout(10):
            admission = await survivor.enqueue_and_wait(
                FlowControlRequest(request_id="after", ttl_ms=10_000)
            )
        assert admission.admitted
        assert admission.wait_ms >= 500
        stats = await survivor.store.client.hgetall(survivor.store.key("pool"))
        # The dead replica's queued request is gone with it; only ours is in flight.
        assert (int(stats[b"inflight"]), int(stats[b"qn"])) == (1, 0)
        await survivor.release(admission.item_id)
    finally:
        doomed.kill()
        doomed.wait()
        if doomed.stdout is not None:
            doomed.stdout.close()


async def test_after_a_restart_one_dead_connection_costs_one_call(own_redis: RedisProcess) -> None:
    """Every pooled connection died with the server: the first call that finds one drops the
    idle rest, so later calls do not each fail once on a dead socket (each a refused request)."""
    client, inbox = connect(own_redis.url, timeout_s=1.0)
    store = PoolStore(client, make_config(limit=100), "a", inbox_client=inbox, coalesce=False)
    try:
        await store.configure()

        async def enqueue() -> object:
            return await store.enqueue(
                band=0, flow="f", workload="", criticality=3, byte_size=0, ttl_ms=60_000
            )

        await asyncio.gather(*(enqueue() for _ in range(6)))  # six pooled connections
        assert len(client.connection_pool._available_connections) >= 2
        own_redis.restart()
        with pytest.raises(StoreError):
            await enqueue()  # its connection was dead; an enqueue is not retried blindly
        results = await asyncio.gather(*(enqueue() for _ in range(5)), return_exceptions=True)
        assert [r for r in results if isinstance(r, BaseException)] == []
    finally:
        await client.aclose()
        await inbox.aclose()
