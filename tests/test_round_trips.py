"""The fast path costs one Redis command to admit and one to release, counted by Redis itself."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest
from redis import asyncio as aioredis

from sidecar.controller import FlowController
from sidecar.request import FlowControlRequest
from sidecar.store import PoolStore
from sidecar.store.connect import connect
from sidecar.workload import WorkloadContext
from tests.conftest import Backend, make_config
from tests.redis_proc import RedisProcess


@pytest.mark.redis
async def test_fast_path_is_one_script_call_each_way(redis_server: RedisProcess) -> None:
    client, inbox = connect(redis_server.url, timeout_s=5.0)
    # MONITOR shows every command a client sends (commands run inside scripts show as "lua").
    watcher = aioredis.from_url(redis_server.url)
    try:
        await client.flushall()
        ctrl = FlowController(PoolStore(client, make_config(limit=4), "r1", inbox_client=inbox))
        await ctrl.start(loops=False)
        request = FlowControlRequest(request_id="r", workload=WorkloadContext("w", 4))
        # The first call loads the library (function not found -> FUNCTION LOAD).
        warm = await ctrl.enqueue_and_wait(request)
        await ctrl.release(warm.item_id)

        monitoring = asyncio.Event()
        seen: list[str] = []

        async def watch() -> None:
            async with watcher.monitor() as monitor:
                monitoring.set()
                async for cmd in monitor.listen():
                    if cmd["command"] == "ECHO end-of-test":
                        return
                    if cmd["client_type"] != "lua":
                        seen.append(cmd["command"].split()[0].upper())

        watching = asyncio.create_task(watch())
        await monitoring.wait()
        admission = await ctrl.enqueue_and_wait(request)
        assert admission.admitted
        assert await ctrl.release(admission.item_id)
        await client.echo("end-of-test")
        await watching
        assert seen == ["FCALL", "FCALL"]
        await ctrl.stop()
    finally:
        await watcher.aclose()
        await client.aclose()
        await inbox.aclose()


async def test_backend_fixture_is_used(backend: Backend, request: pytest.FixtureRequest) -> None:
    """Each parameter of the matrix really is its backend, and the same admission works on both."""
    store = backend.store(make_config(limit=1))
    assert backend.name == request.node.callspec.params["backend"]
    if backend.name == "redis":
        server: RedisProcess = request.getfixturevalue("redis_server")
        assert not isinstance(store.client, fakeredis.FakeAsyncRedis)
        info = await store.client.info("server")
        # The client talks to the redis-server process this session started, not to anything else.
        assert server.proc is not None and info["process_id"] == server.proc.pid
        assert info["tcp_port"] == server.port
        assert len(info["run_id"]) == 40
    else:
        assert backend.name == "fake"
        assert isinstance(store.client, fakeredis.FakeAsyncRedis)
        assert isinstance(store.inbox_client, fakeredis.FakeAsyncRedis)
    ctrl = FlowController(store)
    await ctrl.start(loops=False)
    admission = await ctrl.enqueue_and_wait(FlowControlRequest(request_id="r"))
    assert admission.admitted and await ctrl.release(admission.item_id)
    await ctrl.stop()
