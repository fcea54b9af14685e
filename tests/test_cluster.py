"""A real Redis Cluster (three primaries made with redis-cli --cluster create): every script of
a pool runs on the pool's one slot, and pools with different names spread across shards."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from redis.crc import key_slot

from sidecar.controller import FlowController
from sidecar.keys import pool_prefix
from sidecar.request import FlowControlRequest
from sidecar.store import PoolStore
from sidecar.store.connect import connect
from sidecar.workload import WorkloadContext
from tests.conftest import make_config
from tests.redis_proc import RedisProcess, free_cluster_port

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[RedisProcess]]:
    nodes = [
        RedisProcess(
            port=free_cluster_port(),
            extra=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"],
        )
        for _ in range(3)
    ]
    try:
        for node in nodes:
            node.start()
    except RuntimeError:
        for node in nodes:
            node.kill()
        raise
    cli = shutil.which("redis-cli")
    assert cli, "redis-cli is missing (Debian package redis-tools, a dependency of redis-server)"
    subprocess.run(
        [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes), "--cluster-yes"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    # The cluster is usable once every node reports cluster_state:ok.
    for node in nodes:
        for _ in range(200):
            info = subprocess.run(
                [cli, "-p", str(node.port), "cluster", "info"], capture_output=True, text=True
            ).stdout
            if "cluster_state:ok" in info:
                break
            subprocess.run(["sleep", "0.05"], check=True)
        else:
            raise AssertionError(f"node {node.port} never reached cluster_state:ok")
    yield nodes
    for node in nodes:
        node.kill()


async def test_pools_run_on_a_cluster(cluster: list[RedisProcess]) -> None:
    url = f"redis+cluster://127.0.0.1:{cluster[0].port}"
    # Pools whose hash tags fall on different shards (slots 0-5460, 5461-10922, 10923-16383).
    pools: dict[int, str] = {}
    for i in range(200):
        name = f"pool{i}"
        pools.setdefault(key_slot(pool_prefix(name).encode()) * 3 // 16384, name)
        if len(pools) == 3:
            break
    assert len(pools) == 3
    controllers = []
    for pool in pools.values():
        client, inbox = connect(url, timeout_s=2.0)
        store = PoolStore(client, make_config(limit=1, pool=pool), "r1", inbox_client=inbox)
        ctrl = FlowController(store)
        await ctrl.start()
        controllers.append(ctrl)
    try:
        for ctrl in controllers:
            held = await ctrl.enqueue_and_wait(
                FlowControlRequest(request_id="a", workload=WorkloadContext("w", 3))
            )
            waiting = asyncio.create_task(ctrl.enqueue_and_wait(FlowControlRequest(request_id="b")))
            await ctrl.release(held.item_id)
            nxt = await waiting
            assert nxt.admitted
            assert await ctrl.release(nxt.item_id)
            keys = await ctrl.store.client.keys(f"{ctrl.store.prefix}*", target_nodes="all")
            slots = {key_slot(k) for k in keys}
            assert slots == {key_slot(ctrl.store.prefix.encode())}
    finally:
        for ctrl in controllers:
            await ctrl.stop()
            await ctrl.store.client.aclose()
            await ctrl.store.inbox_client.aclose()
