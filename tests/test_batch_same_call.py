"""Several operations on the same items and slots inside one coalesced call (lua/batch.lua),
checked from outside: what the pool holds after the call is what one call per operation would
have left."""

from __future__ import annotations

from typing import Any

from sidecar import contract
from sidecar.contract import ScriptStatus
from sidecar.registry import METRIC_FIELDS, counters_from_hash
from sidecar.store import PoolStore
from tests.conftest import Backend, make_config

TTL = 60_000
NOW = 1_000


def _enqueue_args(workload: str) -> list[object]:
    # band flow workload criticality bytes ttl-ms lease-ms tokens slo-ms
    return [0, "f", workload, 3, 10, TTL, 0, 0, 0]


async def _held(store: PoolStore, n: int) -> list[str]:
    """`n` slots the replica r1 holds, each taken by an enqueue of its own."""
    ids = []
    for i in range(n):
        raw = await store.call_direct("enqueue", NOW, "r1", *_enqueue_args(f"w{i}"))
        assert int(raw[0]) == ScriptStatus.DISPATCHED
        ids.append(raw[1].decode())
    return ids


async def _batch(store: PoolStore, ops: list[tuple[str, list[object]]], tail: bytes = b"") -> Any:
    return await store.call_direct("batch", NOW + 10, "r1", contract.batch_ops(ops) + tail)


async def _inflight(store: PoolStore) -> int:
    return int(await store.client.hget(store.key(contract.POOL), "inflight"))


async def _held_ids(store: PoolStore) -> set[str]:
    held = await store.client.hkeys(store.key(f"{contract.HELD}1"))
    return {h.decode() for h in held} - {contract.POOL_LAYOUT}


async def test_a_slot_released_twice_in_one_call_is_freed_once(backend: Backend) -> None:
    store = backend.store(make_config(limit=10))
    await store.configure(now=0)
    a, b = await _held(store, 2)
    release = contract.OP_RELEASE_HELD
    replies = await _batch(
        store, [(release, [a, 0, "w0"]), (release, [a, 0, "w0"]), (release, [b, 0, "w1"])]
    )
    assert [int(r) for r in replies] == [
        ScriptStatus.DISPATCHED,
        ScriptStatus.NOT_FOUND,
        ScriptStatus.DISPATCHED,
    ]
    assert await _inflight(store) == 0
    assert await _held_ids(store) == set()
    # Each workload's active count went to 0 once, not below.
    for w in ("w0", "w1"):
        assert int(await store.client.hget(store.key("w:" + w), "active")) == 0


async def test_a_bad_operation_leaves_the_slots_of_the_releases_after_it_held(
    backend: Backend,
) -> None:
    store = backend.store(make_config(limit=10))
    await store.configure(now=0)
    a, b = await _held(store, 2)
    release = contract.OP_RELEASE_HELD
    bad = contract.msgpack_stream(["x", "1"])
    for ops, tail in (
        ([(release, [a, 0, "w0"])], bad + contract.batch_ops([(release, [b, 0, "w1"])])),
        ([], bad + contract.batch_ops([(release, [b, 0, "w1"])])),
    ):
        try:
            await _batch(store, ops, tail)
        except Exception as exc:  # the call's error reply
            assert "unknown or cut short operation" in str(exc)
        else:
            raise AssertionError("a bad operation did not stop the call")
    # The release before the bad operation ran; the one after it never did.
    assert await _held_ids(store) == {b}
    assert await _inflight(store) == 1


async def test_an_item_queued_and_dispatched_in_one_call_leaves_no_record(
    backend: Backend,
) -> None:
    store = backend.store(make_config(limit=1))
    await store.configure(now=0)
    (a,) = await _held(store, 1)
    replies = await _batch(
        store,
        [
            (contract.OP_ENQUEUE, _enqueue_args("w9")),
            (contract.OP_RELEASE_HELD, [a, 0, "w0"]),
        ],
    )
    queued = contract.OP_REPLY.parse(replies[0].decode())
    assert int(queued["status"]) == ScriptStatus.QUEUED
    # The release dispatched it, and told the caller in its reply.
    assert [int(replies[1][0])] == [ScriptStatus.DISPATCHED]
    assert any(queued["a"].encode() in part for part in replies[1][3:])
    assert await _held_ids(store) == {queued["a"]}
    # No item record was left behind for it (its deadline entry stays until its second has
    # passed: lua/maintain.lua pops it then and finds nothing to evict).
    keys = [k.decode() for k in await store.client.keys(store.key("*"))]
    assert not [k for k in keys if k.startswith(store.key(contract.ITEMS))]


async def test_items_queued_together_are_read_back_and_expire_as_one_by_one(
    backend: Backend,
) -> None:
    """Records and deadline entries written together at the call's end are the ones a call per
    enqueue writes: a later call reads each record, and the TTL sweep evicts every one."""
    store = backend.store(make_config(limit=1))
    await store.configure(now=0)
    await _held(store, 1)
    replies = await _batch(store, [(contract.OP_ENQUEUE, _enqueue_args(f"q{i}")) for i in range(5)])
    ids = [contract.OP_REPLY.parse(r.decode())["a"] for r in replies]
    deadline_keys = await store.client.keys(store.key(contract.DEADLINES) + "*")
    assert len(deadline_keys) == 1
    assert [v.decode() for v in await store.client.lrange(deadline_keys[0], 0, -1)] == ids
    assert await store.client.pttl(deadline_keys[0]) > 0
    # Cancelling one reads its record (a call of its own).
    cancelled = await store.cancel(ids[0], ScriptStatus.EVICTED_CANCELLED, now=NOW + 20)
    assert cancelled.status is ScriptStatus.EVICTED_CANCELLED
    await store.maintain(100, force=True, now=NOW + 10 + TTL + 1_000)
    counts = await store.client.hgetall(store.key(contract.POOL))
    assert int(counts[b"qn"]) == 0


async def test_slots_taken_together_are_freed_from_their_records_when_names_are_not_trusted(
    backend: Backend,
) -> None:
    """Past the registry's cap a release's account of its workload is not taken on trust
    (contract.ANON_FALLBACK): the pool frees each slot by its record, which the call's start
    already took out of the held hash."""
    store = backend.store(make_config(limit=10, workloadRegistry={"maxTracked": 1}))
    await store.configure(now=0)
    tracked, untracked = await _held(store, 2)
    assert await store.client.hget(store.key(contract.POOL), contract.ANON_FALLBACK) == b"1"
    release = contract.OP_RELEASE_HELD
    replies = await _batch(store, [(release, [untracked, 0, "w1"]), (release, [tracked, 0, "w0"])])
    assert [int(r) for r in replies] == [ScriptStatus.DISPATCHED] * 2
    assert await _inflight(store) == 0
    assert int(await store.client.hget(store.key("anon"), "active")) == 0
    assert int(await store.client.hget(store.key("w:w0"), "active")) == 0


async def test_a_call_stopped_by_an_error_leaves_nothing_to_the_next_call(
    backend: Backend,
) -> None:
    """The library keeps its per-call tables between calls and empties them (clear,
    init_config in lua/includes/config.lua): a call that a Redis error stops before it writes
    the pool's counters must not hand what it counted to the next call."""
    store = backend.store(make_config(limit=1))
    await store.configure(now=0)
    await _held(store, 1)
    first = await store.call_direct("enqueue", NOW, "r1", *_enqueue_args("wa"))
    assert int(first[0]) == ScriptStatus.QUEUED
    # The next item's lane is not a list: its RPUSH fails after the call counted the item.
    lane = store.key(contract.LANE + "0|f|wb|3")
    await store.client.set(lane, "not a list")
    try:
        await store.call_direct("enqueue", NOW, "r1", *_enqueue_args("wb"))
    except Exception as exc:  # the call's error reply
        assert "WRONGTYPE" in str(exc) or "wrong kind" in str(exc)
    else:
        raise AssertionError("the enqueue into a key of another type did not fail")
    await store.client.delete(lane)
    second = await store.call_direct("enqueue", NOW, "r1", *_enqueue_args("wb"))
    assert int(second[0]) == ScriptStatus.QUEUED
    # The stopped call's sequence number and queue counts were never written, and the next
    # call did not take them from it: the ids are consecutive and two items are counted.
    assert int(second[1]) == int(first[1]) + 1
    pool = store.key(contract.POOL)
    assert int(await store.client.hget(pool, "qn")) == 2
    assert int(await store.client.hget(pool, "qbytes")) == 20
    # Nor the stopped call's count of its workload (lua/includes/registry.lua keeps workload
    # states between calls): wb's one request is counted once, and it is active once.
    wb = await store.client.hmget(store.key(contract.workload_key("wb")), *METRIC_FIELDS)
    counted = counters_from_hash(wb)
    assert (counted.current + counted.previous, counted.active) == (1, 1)
