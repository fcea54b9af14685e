"""The hot scripts keep a pool's parsed configuration between calls (lua/includes/config.lua
load_cfg_hot), valid while the pool's configuration digest is unchanged: a reconfiguration, a
flushed and differently configured pool, or a configuration that leaves settings out must all
be seen by the very next admission. And the list of bands with queued items ('qb'), which the
hot scripts read instead of scanning the pool hash, is rebuilt for a pool written without it."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar import contract
from sidecar.outcome import ScriptStatus
from sidecar.state import read_state
from sidecar.store import PoolStore
from sidecar.store.connect import connect
from tests.conftest import Backend, make_config

TTL = 60_000


async def enq(store: PoolStore, now: int, band: int = 0) -> Any:
    return await store.enqueue(
        now=now, band=band, flow="f", workload="w", criticality=3, byte_size=10, ttl_ms=TTL
    )


async def test_a_reconfigured_limit_binds_the_next_admission(backend: Backend) -> None:
    one = backend.store(make_config(limit=1))
    await one.configure(now=0)
    assert (await enq(one, 10)).status is ScriptStatus.DISPATCHED
    assert (await enq(one, 11)).status is ScriptStatus.QUEUED
    # Another replica (same pool) raises the limit: the queued item goes at the next release
    # or admission, and the new one is dispatched on the fast path... once nothing waits.
    three = backend.store(make_config(limit=3))
    await three.configure(now=20)
    third = await enq(three, 21)
    assert third.status is ScriptStatus.DISPATCHED
    pool = await one.client.hgetall(one.key(contract.POOL))
    assert int(pool[b"inflight"]) == 3 and int(pool[b"qn"]) == 0
    # And back down: the fast path sees limit 1 at once.
    await one.configure(now=30)
    assert (await enq(one, 31)).status is ScriptStatus.QUEUED


async def test_a_flushed_pool_configured_otherwise_is_read_afresh(backend: Backend) -> None:
    first = backend.store(make_config(limit=1))
    await first.configure(now=0)
    assert (await enq(first, 10)).status is ScriptStatus.DISPATCHED
    await first.client.flushall()
    # Same pool, same epoch, another limit: the hot path must not run on the one it kept.
    again = backend.store(make_config(limit=2))
    await again.configure(now=0)
    statuses = [(await enq(again, 12)).status for _ in range(3)]
    assert statuses == [ScriptStatus.DISPATCHED, ScriptStatus.DISPATCHED, ScriptStatus.QUEUED]


async def test_reconfiguring_drops_the_settings_a_configuration_leaves_out(
    backend: Backend,
) -> None:
    utilization = make_config(
        saturationDetector={
            "type": "utilization-detector",
            "parameters": {"endpoints": ["http://127.0.0.1:9"]},
        }
    )
    store = backend.store(utilization)
    await store.configure(now=0)
    # No sample was ever written: the utilization detector fails closed.
    assert (await enq(store, 10)).status is ScriptStatus.QUEUED
    tokens = make_config(
        limit=5,
        saturationDetector={
            "parameters": {
                "maxConcurrency": 5,
                "concurrencyMode": "hybrid",
                "maxTokenConcurrency": 1000,
            }
        },
    )
    await backend.store(tokens).configure(now=20)
    pool = await store.client.hgetall(store.key(contract.POOL))
    assert b"det" not in pool and b"stale" not in pool and b"tokLimit" in pool
    plain = backend.store(make_config(limit=5))
    await plain.configure(now=30)
    pool = await store.client.hgetall(store.key(contract.POOL))
    assert b"tokLimit" not in pool
    # The concurrency detector now decides: the queued item went with the next admission.
    assert (await enq(plain, 31)).status is ScriptStatus.DISPATCHED
    pool = await store.client.hgetall(store.key(contract.POOL))
    assert int(pool[b"inflight"]) == 2 and int(pool[b"qn"]) == 0


async def test_a_pool_without_its_band_list_still_dispatches_by_priority(
    backend: Backend,
) -> None:
    store = backend.store(make_config(limit=1))
    await store.configure(now=0)
    first = await enq(store, 1)
    low = await enq(store, 2, band=-1)
    high = await enq(store, 3, band=5)
    assert (low.status, high.status) == (ScriptStatus.QUEUED, ScriptStatus.QUEUED)
    pool = await store.client.hgetall(store.key(contract.POOL))
    assert set(pool[b"qb"].decode().split(contract.ID_LIST_SEP)) == {"-1", "5"}
    # As a pool written before the list existed (deleted by hand, with the write stamp, so the
    # scripts read the pool afresh: tests/test_pool_cache.py).
    await store.client.hdel(store.key(contract.POOL), "qb", contract.POOL_STAMP)
    released = await store.release(first.item_id, now=4)
    assert [d.item_id for d in released.deliveries] == [high.item_id]
    pool = await store.client.hgetall(store.key(contract.POOL))
    assert pool[b"qb"] == b"-1"
    released = await store.release(high.item_id, now=5)
    assert [d.item_id for d in released.deliveries] == [low.item_id]
    pool = await store.client.hgetall(store.key(contract.POOL))
    assert pool[b"qb"] == b""


@pytest.mark.redis
async def test_the_pool_hash_is_a_hashtable_so_its_fields_are_found_without_a_scan(
    redis_server: Any,
) -> None:
    """configure.lua writes contract.POOL_LAYOUT, a value past hash-max-listpack-value: a pool
    hash of a couple of dozen short fields would otherwise be a listpack, where each of the
    dozen fields a call reads or writes is a scan of the whole hash."""
    assert len(contract.POOL_LAYOUT_NOTE) > 64  # Redis's default hash-max-listpack-value
    client, inbox = connect(redis_server.url, timeout_s=5.0)
    try:
        await client.flushall()
        store = PoolStore(client, make_config(limit=1), "r1", inbox_client=inbox)
        await store.configure(now=0)
        await enq(store, 1)
        key = store.key(contract.POOL)
        assert await client.hget(key, contract.POOL_LAYOUT) == contract.POOL_LAYOUT_NOTE.encode()
        assert await client.object("encoding", key) == b"hashtable"
    finally:
        await client.aclose()
        await inbox.aclose()


@pytest.mark.redis
async def test_a_replicas_held_hash_is_a_hashtable_and_goes_with_its_last_slot(
    redis_server: Any,
) -> None:
    """A replica's held hash carries contract.POOL_LAYOUT from the moment the replica gets its
    number, so finding or adding one of its tens of slots is no scan; nothing that counts its
    slots counts the field, and once the replica is reclaimed the hash goes with its last slot."""
    client, inbox = connect(redis_server.url, timeout_s=5.0)
    try:
        await client.flushall()
        store = PoolStore(client, make_config(limit=10), "r1", inbox_client=inbox)
        await store.configure(now=0)
        assert (await store.heartbeat(1000, now=1)).known is False
        item = await enq(store, 2)
        key = store.key(contract.held_key(1))
        assert await client.object("encoding", key) == b"hashtable"
        assert await client.hlen(key) == 2
        # The heartbeat's comparison and /state count the one slot, not the field.
        assert (await store.heartbeat(1000, now=3, owned=1)).differs is False
        assert (await store.heartbeat(1000, now=4, owned=2)).differs is True
        state = await read_state(store)
        assert [r.owned for r in state.replicas] == [1]
        # Its lease lapses: reclaimed, slot and hash.
        await store.maintain(1, force=True, now=10_000)
        assert await client.exists(key) == 0
        assert int(await client.hget(store.key(contract.POOL), "inflight") or 0) == 0
        assert (await store.release(item.item_id, now=10_001)).status is ScriptStatus.NOT_FOUND
    finally:
        await client.aclose()
        await inbox.aclose()
