"""State transitions of the Lua scripts, on fakeredis and on a real redis-server."""

from __future__ import annotations

from typing import Any

from sidecar import contract
from sidecar.config import Config
from sidecar.outcome import ScriptStatus
from sidecar.store import PoolStore
from tests.conftest import Backend, make_config
from tests.pool_keys import inflight_records, queued_record

TTL = 60_000


async def enq(store: PoolStore, now: int, workload: str = "", **kw: Any) -> Any:
    args: dict[str, Any] = {
        "band": 0,
        "flow": "f",
        "workload": workload,
        "criticality": 3,
        "byte_size": 10,
        "ttl_ms": TTL,
    }
    args.update(kw)
    return await store.enqueue(now=now, **args)


async def drain(store: PoolStore, first: str, now: int) -> list[str]:
    """Releases the slot held by ``first`` and then each dispatched item in turn (limit 1)."""
    order: list[str] = []
    current = first
    while True:
        reply = await store.release(current, now=now)
        assert reply.status is ScriptStatus.DISPATCHED
        if not reply.deliveries:
            return order
        (delivery,) = reply.deliveries
        assert delivery.status is ScriptStatus.DISPATCHED
        order.append(delivery.item_id)
        current = delivery.item_id


async def test_fast_path_dispatches_and_release_is_idempotent(backend: Backend) -> None:
    store = backend.store(make_config(limit=2))
    await store.configure(now=0)
    a = await enq(store, 1000)
    b = await enq(store, 1000)
    c = await enq(store, 1000)
    assert (a.status, b.status, c.status) == (
        ScriptStatus.DISPATCHED,
        ScriptStatus.DISPATCHED,
        ScriptStatus.QUEUED,
    )
    released = await store.release(a.item_id, now=1500)
    assert released.status is ScriptStatus.DISPATCHED
    assert [(d.item_id, d.status, d.wait_ms) for d in released.deliveries] == [
        (c.item_id, ScriptStatus.DISPATCHED, 500)
    ]
    again = await store.release(a.item_id, now=1600)
    assert again.status is ScriptStatus.NOT_FOUND and again.deliveries == []
    stats = await store.client.hgetall(store.key("pool"))
    assert int(stats[b"inflight"]) == 2 and int(stats[b"qn"]) == 0


async def test_strict_priority_across_bands(backend: Backend) -> None:
    store = backend.store(make_config(limit=1))
    await store.configure(now=0)
    first = await enq(store, 1)
    low = await enq(store, 2, band=-1)
    mid = await enq(store, 3, band=0)
    high = await enq(store, 4, band=100)
    assert await drain(store, first.item_id, 10) == [high.item_id, mid.item_id, low.item_id]


async def test_fcfs_and_edf_orderings(backend: Backend) -> None:
    cfg = make_config(
        limit=1,
        flowControl={
            "priorityBands": [
                {"priority": 1, "orderingPolicy": {"type": "fcfs-ordering-policy"}},
                {"priority": 2, "orderingPolicy": {"type": "edf-ordering-policy"}},
            ]
        },
    )
    store = backend.store(cfg)
    await store.configure(now=0)
    first = await enq(store, 1)
    fcfs = [(await enq(store, 10 + i, band=1, criticality=5 - i)).item_id for i in range(3)]
    assert await drain(store, first.item_id, 100) == fcfs
    first = await enq(store, 200)
    late = await enq(store, 201, band=2, ttl_ms=9_000)
    early = await enq(store, 202, band=2, ttl_ms=1_000)
    same = await enq(store, 203, band=2, ttl_ms=999)  # same deadline as `early`: enqueue order
    assert await drain(store, first.item_id, 300) == [early.item_id, same.item_id, late.item_id]


def round_robin(ordering: str) -> Config:
    """One slot, and the default band round-robin over flows with ``ordering`` inside each."""
    fairness = {"type": "round-robin-fairness-policy"}
    band = {"fairnessPolicy": fairness, "orderingPolicy": {"type": ordering}}
    return make_config(limit=1, flowControl={"defaultPriorityBand": band})


async def test_round_robin_fairness_alternates_flows(backend: Backend) -> None:
    store = backend.store(round_robin("fcfs-ordering-policy"))
    await store.configure(now=0)
    first = await enq(store, 1)
    a = [(await enq(store, 2, flow="a")).item_id for _ in range(3)]
    b = [(await enq(store, 3, flow="b")).item_id for _ in range(2)]
    c = [(await enq(store, 4, flow="c")).item_id for _ in range(1)]
    order = await drain(store, first.item_id, 10)
    assert order == [a[0], b[0], c[0], a[1], b[1], a[2]]


async def test_global_strict_fairness_takes_best_head_across_flows(backend: Backend) -> None:
    cfg = make_config(
        limit=1,
        flowControl={"defaultPriorityBand": {"orderingPolicy": {"type": "fcfs-ordering-policy"}}},
    )
    store = backend.store(cfg)
    await store.configure(now=0)
    first = await enq(store, 1)
    ids = [(await enq(store, 2 + i, flow=f)).item_id for i, f in enumerate("abab")]
    assert await drain(store, first.item_id, 10) == ids


async def test_queue_caps_reject_with_capacity(backend: Backend) -> None:
    cfg = make_config(
        limit=1,
        flowControl={
            "maxRequests": 3,
            "maxBytes": 1000,
            "priorityBands": [{"priority": 5, "maxRequests": 1}, {"priority": 6, "maxBytes": 100}],
        },
    )
    store = backend.store(cfg)
    await store.configure(now=0)
    await enq(store, 1)  # in flight: caps count queued requests only
    assert (await enq(store, 2, band=5)).status is ScriptStatus.QUEUED
    assert (await enq(store, 3, band=5)).status is ScriptStatus.REJECTED_CAPACITY  # band requests
    assert (await enq(store, 4, band=6, byte_size=101)).status is ScriptStatus.REJECTED_CAPACITY
    assert (await enq(store, 5, band=6, byte_size=100)).status is ScriptStatus.QUEUED
    assert (await enq(store, 6, byte_size=900)).status is ScriptStatus.REJECTED_CAPACITY  # bytes
    assert (await enq(store, 7)).status is ScriptStatus.QUEUED
    assert (await enq(store, 8)).status is ScriptStatus.REJECTED_CAPACITY  # global requests


async def test_cancel_removes_queued_and_releases_raced(backend: Backend) -> None:
    store = backend.store(make_config(limit=1))
    await store.configure(now=0)
    first = await enq(store, 1)
    queued = await enq(store, 2)
    cancelled = await store.cancel(queued.item_id, ScriptStatus.EVICTED_CANCELLED, now=3)
    assert cancelled.status is ScriptStatus.EVICTED_CANCELLED
    assert await queued_record(store.client, store.prefix, queued.item_id) is None
    # Never dispatched afterwards: releasing the slot dispatches nothing.
    assert (await store.release(first.item_id, now=4)).deliveries == []
    # A cancel that races a dispatch frees the slot at once.
    holder = await enq(store, 5)
    raced = await enq(store, 6)
    dispatched = await store.release(holder.item_id, now=7)
    assert dispatched.deliveries[0].item_id == raced.item_id
    late = await store.cancel(raced.item_id, ScriptStatus.EVICTED_CANCELLED, now=8)
    assert (late.status, late.detail) == (ScriptStatus.DISPATCHED, "released")
    assert int(await store.client.hget(store.key("pool"), "inflight")) == 0


async def test_ttl_eviction_by_maintenance_notifies_owner_inbox(backend: Backend) -> None:
    cfg = make_config(limit=1)
    owner, other = backend.store(cfg, "owner"), backend.store(cfg, "other")
    await owner.configure(now=0)
    await enq(other, 1)
    expiring = await enq(owner, 2, ttl_ms=100)
    assert await other.maintain(1000, now=50) == []
    # The sweep takes whole seconds of deadlines (includes/lanes.lua's buckets): the item's
    # deadline, 102 ms, is swept once its second has passed.
    assert await other.maintain(1000, force=True, now=999) == []
    assert await owner.pop_inbox(0.01) == []
    assert await other.maintain(1000, force=True, now=1000) == []
    deliveries = await owner.pop_inbox(0.1)
    assert [(d.item_id, d.status, d.wait_ms) for d in deliveries] == [
        (expiring.item_id, ScriptStatus.EVICTED_TTL, 998)
    ]
    stats = await owner.client.hgetall(owner.key("pool"))
    assert int(stats[b"qn"]) == 0


async def test_maintenance_runs_once_per_interval(backend: Backend) -> None:
    store = backend.store(make_config())
    await store.configure(now=0)
    assert (await store._call("maintain", 1000, "r1", 1000, 10, "0"))[0] == 1
    assert (await store._call("maintain", 1500, "r1", 1000, 10, "0"))[0] == 0
    assert (await store._call("maintain", 2000, "r1", 1000, 10, "0"))[0] == 1


async def test_dead_replica_slots_and_queue_are_reclaimed(backend: Backend) -> None:
    cfg = make_config(limit=1)
    dead, alive = backend.store(cfg, "dead"), backend.store(cfg, "alive")
    await dead.configure(now=0)
    assert not (await dead.heartbeat(1000, now=0)).known
    assert not (await alive.heartbeat(1000, now=0)).known
    held = await enq(dead, 10)
    await enq(dead, 20)  # queued on the dead replica: its client is gone with it
    mine = await enq(alive, 30)
    assert (await alive.heartbeat(1000, now=900)).known
    assert await alive.maintain(100, force=True, now=999) == []  # lease not yet out
    deliveries = await alive.maintain(100, force=True, now=1001)
    assert [(d.item_id, d.status) for d in deliveries] == [(mine.item_id, ScriptStatus.DISPATCHED)]
    assert held.item_id not in await inflight_records(alive.client, alive.prefix)
    assert await alive.client.zscore(alive.key("replicas"), "dead") is None
    # The reclaimed replica comes back: it learns it was forgotten.
    assert not (await dead.heartbeat(1000, now=1100)).known


async def test_ticket_leases_expire_unless_renewed(backend: Backend) -> None:
    store = backend.store(make_config(limit=1))
    await store.configure(now=0)
    ticket = await enq(store, 1, lease_ms=100)
    waiting = await enq(store, 2)
    assert await store.renew(ticket.item_id, 100, now=90)
    assert await store.maintain(10, force=True, now=150) == []
    deliveries = await store.maintain(10, force=True, now=191)
    assert [d.item_id for d in deliveries] == [waiting.item_id]
    assert not await store.renew(ticket.item_id, 100, now=200)


async def test_missing_config_is_rewritten_and_the_call_retried(backend: Backend) -> None:
    store = backend.store(make_config(limit=1))
    await store.configure(now=0)
    await store.client.flushall()
    reply = await enq(store, 5)
    assert reply.status is ScriptStatus.DISPATCHED
    assert await store.client.hget(store.key("pool"), "limit") == b"1"


async def test_tickets_outlive_the_replica_that_issued_them(backend: Backend) -> None:
    cfg = make_config(limit=2)
    issuer, other = backend.store(cfg, "issuer"), backend.store(cfg, "other")
    await issuer.configure(now=0)
    await issuer.heartbeat(1000, now=0)
    await other.heartbeat(100_000, now=0)
    fast = await enq(issuer, 10, lease_ms=60_000)  # dispatched at once
    blocker = await enq(other, 11)
    queued = await enq(issuer, 12, lease_ms=60_000)  # dispatched later, by a release
    await other.release(blocker.item_id, now=13)
    # The issuer dies; its lease runs out and the others reclaim what it held.
    await other.maintain(10, force=True, now=5_000)
    inflight = await inflight_records(other.client, other.prefix)
    assert set(inflight) == {fast.item_id, queued.item_id}
    # Only the tickets' own leases end them.
    await other.maintain(10, force=True, now=60_020)
    assert await inflight_records(other.client, other.prefix) == {}


async def test_a_tick_reranks_every_workload_also_when_it_evicted_from_the_band(
    backend: Backend,
) -> None:
    """Maintenance re-ranks every queued workload-aware lane by its workload's counters as they are
    now, also when the same tick changed its band's counts by evicting an item there (found by
    the equivalence property: such a tick skipped the band, and a workload's lanes kept the key of
    a request rate long gone, so a lane with a worse head was dispatched first)."""
    params = {"requestRateWeight": 0.3, "maxRequestRate": 1, "maxWaitTimeSeconds": 1}
    cfg = make_config(
        limit=1,
        workloadRegistry={"requestRateWindow": "2s"},
        flowControl={
            "defaultPriorityBand": {
                "orderingPolicy": {"type": "workload-aware-ordering-policy", "parameters": params}
            }
        },
    )
    store = backend.store(cfg)
    await store.configure(now=0)
    assert (await enq(store, 0, workload="busy")).status is ScriptStatus.DISPATCHED
    for _ in range(3):  # a request rate that raises the workload's part of the key
        assert (await enq(store, 0, workload="busy")).status is ScriptStatus.QUEUED
    await enq(store, 0, workload="brief", flow="g", ttl_ms=100)
    # The workload's one lane in the set: its best, kept in the workload hash (no group zset).
    rank, workload = store.key(contract.RANK + "0"), store.key(contract.WORKLOAD + "busy")
    best = await store.client.hget(workload, contract.WGROUP_FIELD + "0")
    head_part, name, lanes = contract.split_best(best.decode())
    member = name.encode()
    assert lanes == 1
    assert await store.client.zscore(rank, member) != head_part  # plus the rate's part

    # Ten seconds on the rate window (2 s) is empty: the workload's part of the key is 0. The
    # tick evicts 'brief' (its band's count changes) and must still re-rank 'busy'.
    await store.maintain(1000, force=True, now=10_000)
    assert await store.client.zrange(rank, 0, -1, withscores=True) == [(member, head_part)]


async def test_a_flow_stays_in_the_round_while_its_workload_has_another_lane(
    backend: Backend,
) -> None:
    """Round-robin fairness with workload-aware ordering: a dispatch that empties one lane of a
    workload leaves the flow in the band's round when the workload has another lane there, whose
    ranking the dispatch's re-rank defers (found by the equivalence property: the flow left the
    round while its ranking set was empty for the moment, and its last item was never
    dispatched)."""
    store = backend.store(round_robin("workload-aware-ordering-policy"))
    await store.configure(now=0)
    holder = await enq(store, 0, workload="w")
    first = await enq(store, 1, workload="w", criticality=4)
    second = await enq(store, 2, workload="w", criticality=2)
    assert (first.status, second.status) == (ScriptStatus.QUEUED, ScriptStatus.QUEUED)
    took = await store.release(holder.item_id, now=3)
    assert [d.item_id for d in took.deliveries] == [first.item_id]
    took = await store.release(first.item_id, now=4)
    assert [d.item_id for d in took.deliveries] == [second.item_id]


async def test_a_batch_releases_the_slots_it_granted_in_the_same_call(backend: Backend) -> None:
    """batch.lua writes its caller's new held slots with one command when it ends (includes/
    dispatch.lua grants); a release later in the same call still finds them, named with its
    workload (the record deleted unread) or not (the record read)."""
    store = backend.store(make_config(limit=10))
    await store.configure(now=0)
    first = await enq(store, 1, workload="w")  # the caller has a number: its grants are deferred
    second, third = (contract.item_id(int(first.item_id) + n) for n in (1, 2))
    enqueue = [0, "f", "w", 3, 10, TTL, 0, 0, 0]
    raw = await store.call_direct(
        "batch", 2, "r1",
        contract.batch_ops([
            (contract.OP_ENQUEUE, enqueue),
            (contract.OP_RELEASE_HELD, [second, 0, "w"]),
            (contract.OP_ENQUEUE, enqueue),
            (contract.OP_RELEASE, [third]),
        ]),
    )  # fmt: skip
    assert [contract.OP_REPLY.parse(r.decode())["a"] for r in raw[::2]] == [second, third]
    assert raw[1::2] == [ScriptStatus.DISPATCHED, ScriptStatus.DISPATCHED]
    assert set(await inflight_records(store.client, store.prefix)) == {first.item_id}
    pool = await store.client.hgetall(store.key(contract.POOL))
    assert int(pool[b"inflight"]) == 1
    assert int(await store.client.hget(store.key("w:w"), "active")) == 1
