"""The function library keeps each pool's fields between calls (lua/includes/config.lua
POOL_CACHE), valid while the pool's write stamp (contract.POOL_STAMP) is the one it wrote last.
Every call that changes the pool writes a new stamp, so whatever else wrote the pool since is
seen by the next call: another load of the library (a second version of the same layout), a
pool rolled back to an earlier state (writes lost in a failover), data lost, a change by hand
that deletes the stamp. The pool's workload states are kept the same way (lua/includes/
registry.lua WS): a call that changes only a workload hash writes a stamp too."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from sidecar import contract
from sidecar.outcome import ScriptStatus
from sidecar.registry import METRIC_FIELDS, WorkloadCounters, counters_from_hash
from sidecar.store import PoolStore
from sidecar.store.connect import connect
from sidecar.store.scripts import library
from tests.conftest import Backend, make_config
from tests.redis_proc import RedisProcess

TTL = 60_000


async def enq(store: PoolStore, now: int) -> Any:
    return await store.enqueue(
        now=now, band=0, flow="f", workload="w", criticality=3, byte_size=10, ttl_ms=TTL
    )


async def stamp(store: PoolStore) -> bytes | None:
    value: bytes | None = await store.client.hget(store.key(contract.POOL), contract.POOL_STAMP)
    return value


async def counts(store: PoolStore) -> tuple[int, int]:
    raw = await store.client.hmget(store.key(contract.POOL), "inflight", "qn")
    return int(raw[0] or 0), int(raw[1] or 0)


async def workload(store: PoolStore, name: str = "w") -> WorkloadCounters:
    key = store.key(contract.workload_key(name))
    return counters_from_hash(await store.client.hmget(key, *METRIC_FIELDS))


OTHER_LIBRARY = "admission_sidecar_otherload"


class OtherLoad(PoolStore):
    """A replica of another version with the same layout: the same scripts in a library of its
    own, so Redis runs them in a chunk of their own, with a cache of their own."""

    async def _fcall(self, name: str, args: Sequence[object]) -> list[Any]:
        result: list[Any] = await self.client.fcall(
            f"{OTHER_LIBRARY}_{name}", len(self._keys), *self._keys, *args
        )
        return result


async def load_other(client: Any) -> None:
    name, source = library()
    await client.function_load(source.replace(name, OTHER_LIBRARY), replace=True)


async def test_every_call_that_changes_the_pool_writes_a_new_stamp(backend: Backend) -> None:
    store = backend.store(make_config(limit=1))
    await store.configure(now=0)
    seen = [await stamp(store)]
    first = await enq(store, 1)
    seen.append(await stamp(store))
    second = await enq(store, 2)
    seen.append(await stamp(store))
    await store.release(first.item_id, now=3)  # dispatches the second
    seen.append(await stamp(store))
    assert None not in seen and len(set(seen)) == len(seen)
    # A call that changes nothing keeps it: a release of an id the pool no longer holds.
    await store.release(first.item_id, now=4)
    assert await stamp(store) == seen[-1]
    assert second.status is ScriptStatus.QUEUED


async def test_a_change_by_hand_that_deletes_the_stamp_is_read_by_the_next_call(
    backend: Backend,
) -> None:
    store = backend.store(make_config(limit=1))
    await store.configure(now=0)
    assert (await enq(store, 1)).status is ScriptStatus.DISPATCHED
    # The slot freed by hand (as an operator repairing a pool would).
    key = store.key(contract.POOL)
    await store.client.hset(key, mapping={"inflight": 0})
    await store.client.hdel(key, contract.POOL_STAMP)
    # The next admission takes the free slot: had it kept its cached in-flight count (1), it
    # would queue instead.
    assert (await enq(store, 2)).status is ScriptStatus.DISPATCHED
    assert await counts(store) == (1, 0)


@pytest.mark.redis
async def test_two_loads_of_the_library_on_one_pool_read_each_others_writes(
    redis_server: RedisProcess,
) -> None:
    """A rolling upgrade between two versions of one layout: each version's scripts keep their
    own cache of the pool, and each sees what the other wrote at its next call."""
    client, inbox = connect(redis_server.url, timeout_s=5.0)
    try:
        await client.flushall()
        # Both loaded afresh, so neither has written a stamp yet.
        await client.function_flush()
        await client.function_load(library()[1])
        await load_other(client)
        config = make_config(limit=2)
        new = PoolStore(client, config, "r-new", inbox_client=inbox)
        old = OtherLoad(client, config, "r-old", inbox_client=inbox)
        await new.configure(now=0)
        await old.configure(now=0)
        written: dict[str, set[bytes | None]] = {"new": set(), "old": set()}

        async def by(name: str, call: Any) -> Any:
            result = await call
            written[name].add(await stamp(new))
            return result

        a = await by("new", enq(new, 1))
        b = await by("old", enq(old, 2))
        c = await by("new", enq(new, 3))  # sees old's slot taken: the limit of 2 is reached
        assert (a.status, b.status, c.status) == (
            ScriptStatus.DISPATCHED,
            ScriptStatus.DISPATCHED,
            ScriptStatus.QUEUED,
        )
        d = await by("old", enq(old, 4))  # sees new's queued item: queues behind it
        assert d.status is ScriptStatus.QUEUED
        assert await counts(new) == (2, 2)
        # Each release dispatches the other's queued item (to its owner's inbox).
        await by("old", old.release(b.item_id, now=5))
        assert await counts(new) == (2, 1)
        await by("new", new.release(a.item_id, now=6))
        assert await counts(new) == (2, 0)
        await by("new", new.release(c.item_id, now=7))
        await by("old", old.release(d.item_id, now=8))
        assert await counts(old) == (0, 0)
        for i, (name, store) in enumerate([("old", old), ("new", new)] * 3):
            await by(name, enq(store, 9 + i))
        assert await counts(old) == (2, 4)
        # The workload's counters hold every request of both: each load read the other's writes.
        w = await workload(new)
        assert (w.current + w.previous, w.active) == (10, 6)
        # Neither ever writes a stamp the other wrote (else one could take the pool as it
        # cached it after the other changed it).
        assert not written["new"] & written["old"] and None not in written["new"]
    finally:
        await client.aclose()
        await inbox.aclose()


@pytest.mark.redis
async def test_a_pool_rolled_back_to_an_earlier_state_is_read_as_it_is(
    redis_server: RedisProcess,
) -> None:
    """Writes lost in a failover: the replica promoted holds the pool as it was a few calls ago,
    stamp included, while the library that made those calls still has their result cached.
    The stamp it cached is the newest it wrote, which the rolled-back pool does not hold."""
    client, inbox = connect(redis_server.url, timeout_s=5.0)
    try:
        await client.flushall()
        store = PoolStore(client, make_config(limit=2), "r1", inbox_client=inbox)
        await store.configure(now=0)
        first = await enq(store, 1)
        snapshot = {key: await client.dump(key) for key in await client.keys(store.prefix + "*")}
        # Lost: a second slot taken and a request queued.
        assert (await enq(store, 2)).status is ScriptStatus.DISPATCHED
        assert (await enq(store, 3)).status is ScriptStatus.QUEUED
        await client.flushall()
        for key, value in snapshot.items():
            await client.restore(key, 0, value)
        assert await counts(store) == (1, 0)
        # One slot is free in the pool as it is now: a cache of the lost writes would queue.
        assert (await enq(store, 4)).status is ScriptStatus.DISPATCHED
        assert await counts(store) == (2, 0)
        assert (await enq(store, 5)).status is ScriptStatus.QUEUED
        released = await store.release(first.item_id, now=6)
        assert len(released.deliveries) == 1
        # The workload as it is too: the lost requests are not counted, the two since are (and
        # dispatched, the second by the release).
        w = await workload(store)
        assert (w.current + w.previous, w.dispatched, w.active) == (3, 3, 2)
    finally:
        await client.aclose()
        await inbox.aclose()


async def test_a_call_that_changes_only_a_workload_writes_a_new_stamp(backend: Backend) -> None:
    """A request refused for a full queue changes no pool field, but it is counted toward its
    workload's rate: another load of the library must not keep the count it cached."""
    store = backend.store(make_config(limit=1, flowControl={"maxRequests": 1}))
    await store.configure(now=0)
    assert (await enq(store, 1)).status is ScriptStatus.DISPATCHED
    assert (await enq(store, 2)).status is ScriptStatus.QUEUED
    key = store.key(contract.POOL)
    before = await store.client.hgetall(key)
    assert (await enq(store, 3)).status is ScriptStatus.REJECTED_CAPACITY
    after = await store.client.hgetall(key)
    assert after[contract.POOL_STAMP.encode()] != before[contract.POOL_STAMP.encode()]
    del before[contract.POOL_STAMP.encode()], after[contract.POOL_STAMP.encode()]
    assert after == before
    assert (await workload(store)).current == 3


async def test_a_workload_changed_by_hand_with_the_stamp_deleted_is_read_again(
    backend: Backend,
) -> None:
    store = backend.store(make_config(limit=4))
    await store.configure(now=0)
    first = await enq(store, 1)
    await store.release(first.item_id, now=2)
    assert (await workload(store)).current == 1
    # An operator resets the workload's rate window (docs/upgrading.md: delete ws with it).
    key = store.key(contract.workload_key("w"))
    await store.client.hset(
        key, contract.WORKLOAD_COUNTS, contract.COUNTS.encode(0, 40, 0, 1, 2, 0.0)
    )
    await store.client.hdel(store.key(contract.POOL), contract.POOL_STAMP)
    await enq(store, 3)
    assert (await workload(store)).current == 41


@pytest.mark.redis
async def test_workloads_past_the_library_s_bound_are_forgotten_and_read_again(
    redis_server: RedisProcess,
) -> None:
    """The library keeps at most 4096 workload states (lua/includes/registry.lua W_MADE_MAX),
    then lets every pool's go: the states made after are read from their hashes, counts intact."""
    client, inbox = connect(redis_server.url, timeout_s=5.0)
    try:
        await client.flushall()
        store = PoolStore(client, make_config(limit=10), "r1", inbox_client=inbox)
        await store.configure(now=0)
        names = [f"w{i}" for i in range(4500)]
        for rounds in (1, 2):
            for i, name in enumerate(names):
                ticket = await store.enqueue(
                    now=rounds * 10_000 + i,
                    band=0,
                    flow="f",
                    workload=name,
                    criticality=3,
                    byte_size=10,
                    ttl_ms=TTL,
                )
                assert ticket.status is ScriptStatus.DISPATCHED
                await store.release(ticket.item_id, now=rounds * 10_000 + i)
        for name in (names[0], names[4095], names[4096], names[-1]):
            w = await workload(store, name)
            assert (w.current + w.previous, w.dispatched, w.active) == (2, 2, 0), name
    finally:
        await client.aclose()
        await inbox.aclose()
