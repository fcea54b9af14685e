"""Coalescing: concurrent calls of one replica share a round trip and keep their semantics."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sidecar.errors import StoreError
from sidecar.outcome import ScriptStatus
from sidecar.store import PoolStore
from tests.conftest import Backend, make_config


def spy(store: PoolStore) -> list[str]:
    calls: list[str] = []
    real = store._call

    async def counting(name: str, now: int | None, *args: object) -> list[Any]:
        calls.append(name)
        return await real(name, now, *args)

    store._call = counting  # type: ignore[method-assign]
    return calls


async def enqueue(store: PoolStore, workload: str) -> Any:
    return await store.enqueue(
        band=0, flow="f", workload=workload, criticality=3, byte_size=1, ttl_ms=60_000
    )


async def test_calls_of_one_loop_turn_go_in_one_batch(backend: Backend) -> None:
    store = backend.store(make_config(limit=3))
    await store.configure()
    calls = spy(store)
    replies = await asyncio.gather(*(enqueue(store, f"w{i % 4}") for i in range(20)))
    assert calls == ["batch"]
    # Same outcome as one by one: the first three take the slots, the rest queue.
    assert [r.status for r in replies] == [ScriptStatus.DISPATCHED] * 3 + [ScriptStatus.QUEUED] * 17
    releases = await asyncio.gather(*(store.release(r.item_id) for r in replies[:3]))
    assert calls == ["batch", "batch"]
    dispatched = [d.item_id for r in releases for d in r.deliveries]
    assert len(dispatched) == 3 and set(dispatched) <= {r.item_id for r in replies[3:]}


async def test_a_lone_call_uses_its_own_script(backend: Backend) -> None:
    store = backend.store(make_config(limit=3))
    await store.configure()
    calls = spy(store)
    reply = await enqueue(store, "w")
    await store.release(reply.item_id)
    assert calls == ["enqueue", "release"]


async def test_a_failed_batch_fails_every_caller(backend: Backend) -> None:
    store = backend.store(make_config(limit=3))
    await store.configure()

    async def broken(name: str, now: int | None, *args: object) -> list[Any]:
        raise StoreError(f"{name}: connection refused")

    store._call = broken  # type: ignore[method-assign]
    results = await asyncio.gather(*(enqueue(store, "w") for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, StoreError) for r in results)


async def test_a_cancelled_caller_does_not_cancel_the_batch(backend: Backend) -> None:
    store = backend.store(make_config(limit=3))
    await store.configure()
    tasks = [asyncio.create_task(enqueue(store, "w")) for _ in range(4)]
    await asyncio.sleep(0)  # the batch is scheduled; cancel one caller before it is sent
    tasks[0].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    # Its operation still ran (the flow controller shields its calls to keep such replies).
    stats = await store.client.hgetall(store.key("pool"))
    assert int(stats[b"inflight"]) + int(stats.get(b"qn", 0)) == 4


@pytest.mark.parametrize("n", [1, 200])
async def test_large_and_small_bursts_keep_one_outcome_each(backend: Backend, n: int) -> None:
    store = backend.store(make_config(limit=5))
    await store.configure()
    replies = await asyncio.gather(*(enqueue(store, f"w{i % 7}") for i in range(n)))
    ids = [r.item_id for r in replies]
    assert len(set(ids)) == n
    assert sum(r.status is ScriptStatus.DISPATCHED for r in replies) == min(n, 5)
