"""Redis deployments reached through the URL alone: a password, and a Sentinel-managed primary."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio.sentinel import Sentinel

from sidecar.controller import FlowController
from sidecar.request import FlowControlRequest
from sidecar.store import PoolStore
from sidecar.store.connect import connect, mask_url
from tests.conftest import make_config
from tests.http_harness import eventually
from tests.redis_proc import RedisProcess
from tests.sentinel_proc import start_sentinel

pytestmark = pytest.mark.redis


async def admit_and_release(url: str) -> None:
    client, inbox = connect(url, timeout_s=2.0)
    ctrl = FlowController(PoolStore(client, make_config(limit=1), "r1", inbox_client=inbox))
    try:
        await ctrl.start()
        admission = await ctrl.enqueue_and_wait(FlowControlRequest(request_id="r"))
        assert admission.admitted
        assert await ctrl.release(admission.item_id)
    finally:
        await ctrl.stop()
        await client.aclose()
        await inbox.aclose()


@pytest.fixture
def password_redis() -> Iterator[RedisProcess]:
    server = RedisProcess(extra=["--requirepass", "s3cret"]).start()
    yield server
    server.kill()


async def test_password_in_the_url(password_redis: RedisProcess) -> None:
    url = f"redis://:s3cret@127.0.0.1:{password_redis.port}/0"
    await admit_and_release(url)
    assert mask_url(url) == f"redis://:***@127.0.0.1:{password_redis.port}/0"


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[tuple[RedisProcess, RedisProcess]]:
    primary = RedisProcess().start()
    watcher = start_sentinel(tmp_path, primary.port)
    yield primary, watcher
    watcher.kill()
    primary.kill()


async def test_sentinel_url_finds_the_primary(sentinel: tuple[RedisProcess, RedisProcess]) -> None:
    primary, watcher = sentinel
    probe = Sentinel([("127.0.0.1", watcher.port)], socket_timeout=1.0)  # type: ignore[no-untyped-call, unused-ignore]

    async def knows_primary() -> bool:
        try:
            address = await probe.discover_master("mymaster")
        except Exception:
            return False
        return bool(address[1] == primary.port)

    await eventually(knows_primary)
    await admit_and_release(f"redis+sentinel://127.0.0.1:{watcher.port}/mymaster/0")
    for s in probe.sentinels:
        await s.aclose()


async def test_the_clients_speak_resp2_whatever_redis_pys_default(
    redis_server: RedisProcess,
) -> None:
    """The store parses RESP2 replies (a script's false arrives as nil); redis-py 8.2 made RESP3
    its default, which also sends a HELLO that a proxy or an old server may not answer."""
    client, inbox = connect(redis_server.url, timeout_s=2.0)
    try:
        for c in (client, inbox):
            info = await c.execute_command("CLIENT", "INFO")
            assert b"resp=2" in info, info
    finally:
        await client.aclose()
        await inbox.aclose()
