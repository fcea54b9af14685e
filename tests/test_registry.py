"""Registry math kept by the scripts: EMA of waits, sliding-window rate, lifecycle, expiry."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar import contract
from sidecar.outcome import ScriptStatus
from sidecar.registry import WorkloadRegistry, ema_update, window_rate
from sidecar.store import PoolStore
from sidecar.store.connect import connect
from tests.conftest import Backend, make_config
from tests.redis_proc import RedisProcess
from tests.test_store_basics import enq


def test_window_rate_is_smooth_and_first_request_is_low() -> None:
    # One request in a 60 s window reads as 1/60 req/s, whatever its age.
    assert window_rate(0, 1, 0, now_ms=10, window_ms=60_000) == pytest.approx(1 / 60)
    # Half-way into the next bucket, the previous bucket counts half.
    assert window_rate(0, 30, 0, now_ms=90_000, window_ms=60_000) == pytest.approx(0.25)
    assert window_rate(1, 10, 30, now_ms=90_000, window_ms=60_000) == pytest.approx(25 / 60)
    assert window_rate(0, 30, 0, now_ms=120_000, window_ms=60_000) == 0.0
    assert window_rate(None, 0, 0, now_ms=5, window_ms=60_000) == 0.0


def test_ema_first_sample_sets_it() -> None:
    assert ema_update(None, 4.0, 0.2) == 4.0
    assert ema_update(4.0, 9.0, 0.2) == pytest.approx(0.2 * 9 + 0.8 * 4)


async def test_scripts_keep_ema_of_dispatch_waits(backend: Backend) -> None:
    store = backend.store(make_config(limit=1))
    await store.configure(now=0)
    registry = WorkloadRegistry(store)
    first = await enq(store, 1000, workload="w")  # dispatched at once: wait 0 sets the EMA
    second = await enq(store, 1000, workload="w")
    third = await enq(store, 1000, workload="w")
    await store.release(first.item_id, now=3000)  # second waited 2 s
    await store.release(second.item_id, now=6000)  # third waited 5 s
    metrics = await registry.get_metrics("w", now_ms=6000)
    assert metrics is not None
    assert metrics.dispatched == 3
    assert metrics.avg_wait_s == pytest.approx(ema_update(ema_update(0.0, 2.0, 0.2), 5.0, 0.2))
    assert metrics.active == 1
    await store.release(third.item_id, now=7000)
    assert (await registry.get_metrics("w", now_ms=7000)).active == 0  # type: ignore[union-attr]


async def test_first_request_reads_as_low_rate(backend: Backend) -> None:
    store = backend.store(make_config(limit=1))
    await store.configure(now=0)
    registry = WorkloadRegistry(store)
    await enq(store, 61_000, workload="new")
    # ~0.017 req/s over the 60 s window, not ~1000 req/s as a 1 ms-old fixed window would say.
    assert await registry.get_request_rate("new", now_ms=61_001) == pytest.approx(1 / 60, rel=1e-3)


async def test_rejected_requests_count_toward_rate(backend: Backend) -> None:
    store = backend.store(make_config(limit=1, flowControl={"maxRequests": 1}))
    await store.configure(now=0)
    registry = WorkloadRegistry(store)
    await enq(store, 10, workload="greedy")
    await enq(store, 10, workload="greedy")
    outcomes = [(await enq(store, 10, workload="greedy")).status for _ in range(8)]
    assert outcomes == [ScriptStatus.REJECTED_CAPACITY] * 8
    metrics = await registry.get_metrics("greedy", now_ms=10)
    assert metrics is not None
    assert metrics.request_rate == pytest.approx(10 / 60)
    assert metrics.active == 2  # rejected requests are not active


async def test_idle_workloads_expire(backend: Backend) -> None:
    store = backend.store(make_config(limit=5, workloadRegistry={"idleTimeout": "5m"}))
    await store.configure(now=0)
    done = await enq(store, 1000, workload="idle")
    busy = await enq(store, 1000, workload="busy")
    await store.release(done.item_id, now=2000)
    # Idle counts from the workload's last request (1000), once nothing of it is queued or in
    # flight.
    await store.maintain(1, force=True, now=1000 + 299_000)
    assert await store.client.exists(store.key("w:idle")) == 1
    await store.maintain(1, force=True, now=1000 + 301_000)
    assert await store.client.exists(store.key("w:idle")) == 0
    assert await store.client.zscore(store.key("workloads"), "idle") is None
    # A workload with a request in flight is not idle, however long ago it arrived.
    assert await store.client.exists(store.key("w:busy")) == 1
    await store.release(busy.item_id, now=400_000)
    assert await store.client.exists(store.key("w:busy")) == 1


async def test_anonymous_requests_store_nothing_per_request(backend: Backend) -> None:
    store = backend.store(make_config(limit=2))
    await store.configure(now=0)
    held = [(await enq(store, 10 + i)).item_id for i in range(2)]
    queued = [await enq(store, 20 + i) for i in range(50)]
    for item in held:
        await store.release(item, now=100)
    keys = {k.decode() for k in await store.client.keys("*")}
    assert not any(":w:" in k or "wlanes" in k for k in keys)
    assert await store.client.zcard(store.key("workloads")) == 0
    anon = await store.client.hgetall(store.key("anon"))
    assert int(anon[b"active"]) == 50  # one aggregate for all anonymous traffic
    assert queued[-1].status is ScriptStatus.QUEUED


async def test_max_tracked_caps_registry_size(backend: Backend) -> None:
    store = backend.store(make_config(limit=100, workloadRegistry={"maxTracked": 3}))
    await store.configure(now=0)
    for i in range(10):
        await enq(store, 10, workload=f"w{i}")
    assert await store.client.zcard(store.key("workloads")) == 3
    assert await store.client.exists(store.key("w:w9")) == 0
    assert int(await store.client.hget(store.key("anon"), "active")) == 7


async def test_a_release_naming_a_workload_counted_as_anonymous_frees_the_anonymous_count(
    backend: Backend,
) -> None:
    """Past the cap a request counts as anonymous while its replica knows it by name, so a release
    that names the slot's workload (contract.BATCH_RELEASE_HELD) is not taken on trust then: the
    pool reads the slot's record, until nothing is queued or in flight."""
    store = backend.store(make_config(limit=100, workloadRegistry={"maxTracked": 1}))
    await store.configure(now=0)
    pool = store.key(contract.POOL)
    tracked = await enq(store, 10, workload="w0")
    untracked = await enq(store, 10, workload="w1")
    assert int(await store.client.hget(store.key("anon"), "active")) == 1
    assert await store.client.hget(pool, contract.ANON_FALLBACK) == b"1"

    reply = await store.release(untracked.item_id, now=20, held=("w1", 0))
    assert reply.status is ScriptStatus.DISPATCHED
    assert int(await store.client.hget(store.key("anon"), "active")) == 0
    assert await store.client.exists(store.key("w:w1")) == 0
    # w0 still holds a slot: the mark stays; the last release takes it away.
    assert await store.client.hget(pool, contract.ANON_FALLBACK) == b"1"
    await store.release(tracked.item_id, now=30, held=("w0", 0))
    assert await store.client.hget(pool, contract.ANON_FALLBACK) is None
    assert int(await store.client.hget(store.key("w:w0"), "active")) == 0
    # A second release of either is still a no-op.
    again = await store.release(untracked.item_id, now=40, held=("w1", 0))
    assert again.status is ScriptStatus.NOT_FOUND
    assert int(await store.client.hget(store.key("anon"), "active")) == 0


# The HGET of the pool's write stamp (contract.POOL_STAMP) each call makes first.
STAMP = 1


async def hget_calls(client: Any) -> tuple[int, int]:
    """HGET and HDEL calls since the last CONFIG RESETSTAT."""
    stats = await client.info("commandstats")
    hget, hdel = (int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("hget", "hdel"))
    return hget, hdel


@pytest.mark.redis
async def test_a_release_naming_its_slot_deletes_the_record_without_reading_it(
    redis_server: RedisProcess,
) -> None:
    """The point of naming the slot's workload and tokens: one command on the slot's record, not
    two; alone (release.lua) and coalesced (batch.lua). Commands inside scripts are counted."""
    client, inbox = connect(redis_server.url, timeout_s=5.0)
    try:
        await client.flushall()
        store = PoolStore(client, make_config(limit=10), "r1", inbox_client=inbox)
        await store.configure(now=0)
        ids = [(await enq(store, 10, workload="w", tokens=0)).item_id for _ in range(4)]
        await client.config_resetstat()
        await store.release(ids[0], now=20, held=("w", 0))
        # (Each call also reads the pool's write stamp, contract.POOL_STAMP: one HGET.)
        assert await hget_calls(client) == (STAMP, 1)
        await store.release(ids[1], now=20)
        assert await hget_calls(client) == (2 * STAMP + 1, 2)
        ops = contract.batch_ops((contract.OP_RELEASE_HELD, [i, 0, "w"]) for i in ids[2:])
        await client.config_resetstat()
        raw = await store.call_direct("batch", 30, "r1", ops)
        # A coalesced release's reply with no outcome is its status alone.
        assert raw == [ScriptStatus.DISPATCHED, ScriptStatus.DISPATCHED]
        assert await hget_calls(client) == (STAMP, 2)
        assert int(await client.hget(store.key("w:w"), "active")) == 0
    finally:
        await client.aclose()
        await inbox.aclose()
