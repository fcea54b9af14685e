"""The lifecycle defects measured on the first landing (issue 7), each reproduced as a test.

1. a release cancelled by its client's disconnect dropped the reply that carried the dispatches
   of this replica's queued requests (they sat idle with a slot taken until their TTL);
2. the breaker's half-open trial was a whole queue wait: a trial whose client gave up left the
   breaker open for good;
3. a background loop died on an exception other than StoreError;
4. a waiter re-queued by recovery that landed on the fast path was enqueued a second time;
5. after Redis lost its data, replicas admitted before re-registering what they still held, and
   tickets were not re-registered at all;
6. (tests/test_proxy_faults.py) an upstream failing mid-stream got a second response written
   into the body.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from redis import asyncio as aioredis

from sidecar import contract
from sidecar.breaker import CircuitBreaker
from sidecar.controller import FlowController
from sidecar.lifecycle import Admission
from sidecar.metrics import Metrics
from sidecar.outcome import Outcome
from sidecar.request import FlowControlRequest
from sidecar.service import AdmissionService
from sidecar.store.connect import connect
from sidecar.store.pool import Delivery
from sidecar.workload import WorkloadContext
from tests.conftest import Backend, make_config
from tests.http_harness import eventually
from tests.redis_proc import RedisProcess


async def stats(ctrl: FlowController) -> dict[str, int]:
    """The pool's counters (the pool hash also holds its configuration)."""
    fields = contract.STATS_FIELDS
    raw = await ctrl.store.client.hmget(ctrl.store.key(contract.POOL), *fields)
    return {k: int(v) for k, v in zip(fields, raw, strict=True) if v is not None}


def req(name: str, workload: str = "w", ttl_ms: int = 30_000) -> FlowControlRequest:
    return FlowControlRequest(request_id=name, workload=WorkloadContext(workload), ttl_ms=ttl_ms)


# 1 ---------------------------------------------------------------------------------------------


async def test_cancelled_release_still_wakes_the_waiter_it_dispatched(backend: Backend) -> None:
    """The release runs in Redis although its caller is gone; the dispatch it made must arrive."""
    ctrl = FlowController(backend.store(make_config(limit=1)))
    await ctrl.start(loops=False)
    try:
        holder = await ctrl.enqueue_and_wait(req("h"))
        waiting = asyncio.create_task(ctrl.enqueue_and_wait(req("q")))
        await eventually(lambda: ctrl.waiting == 1)
        releasing = asyncio.create_task(ctrl.release(holder.item_id))
        await asyncio.sleep(0)  # the release is on the wire (coalesced for this loop turn)
        releasing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await releasing
        # Without the reply the waiter would sit until its 30 s TTL: the test's timeout fails it.
        admitted = await asyncio.wait_for(waiting, 10)
        assert admitted.outcome is Outcome.DISPATCHED
        await ctrl.release(admitted.item_id)
        assert (await stats(ctrl))["inflight"] == 0
    finally:
        await ctrl.stop()


# 2 ---------------------------------------------------------------------------------------------


class ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.redis
async def test_half_open_trial_whose_client_gives_up_does_not_stick() -> None:
    server = RedisProcess().start()
    client, inbox = connect(server.url, timeout_s=0.2)
    admin = aioredis.from_url(server.url)
    clock = ManualClock()
    config = make_config(limit=1)
    breaker = CircuitBreaker(threshold=3, cooldown_s=1.0, clock=clock)
    from sidecar.store import PoolStore

    store = PoolStore(client, config, "r1", inbox_client=inbox, breaker=breaker)
    ctrl = FlowController(store)
    service = AdmissionService(config, ctrl, Metrics(config.pool), breaker)
    await ctrl.start(loops=False)
    try:
        ticket = await service.admit(req("ticket"), lease_ms=60_000)
        assert getattr(ticket, "admitted", False)
        await admin.client_pause(5000, all=True)
        for i in range(3):
            refused = await service.admit(req(f"p{i}"))
            assert not getattr(refused, "admitted", False)
        assert breaker.is_open
        await admin.client_unpause()
        clock.now += 2.0  # past the cool-down: the next store call is the trial
        trial = asyncio.create_task(service.admit(req("trial")))
        await eventually(lambda: ctrl.waiting == 1)  # it queued behind the ticket
        assert not breaker.is_open  # the trial was one store call, and it succeeded
        trial.cancel()
        with pytest.raises(asyncio.CancelledError):
            await trial
        assert isinstance(ticket, object) and hasattr(ticket, "item_id")
        await ctrl.release(ticket.item_id)
        after = await service.admit(req("after"))
        assert getattr(after, "outcome", None) is Outcome.DISPATCHED
    finally:
        await ctrl.stop()
        await client.aclose()
        await inbox.aclose()
        await admin.aclose()
        server.stop()


# 3 ---------------------------------------------------------------------------------------------


async def test_heartbeat_loop_survives_an_unexpected_exception(backend: Backend) -> None:
    config = make_config(limit=1, redis={"heartbeatInterval": "10ms", "maintenanceInterval": "1h"})
    ctrl = FlowController(backend.store(config))
    await ctrl.start(loops=False)
    beats = 0
    beaten_again = asyncio.Event()
    original = ctrl.store.heartbeat

    async def flaky(
        lease_ms: int, now: int | None = None, owned: int | None = None, direct: bool = False
    ) -> Any:
        nonlocal beats
        beats += 1
        if beats == 1:
            raise KeyError("state changed across an await")
        beaten_again.set()
        return await original(lease_ms, now=now, owned=owned, direct=direct)

    ctrl.store.heartbeat = flaky  # type: ignore[method-assign]
    ctrl.start_loops()
    try:
        await asyncio.wait_for(beaten_again.wait(), 10)
        assert ctrl.loop_errors >= 1
    finally:
        await ctrl.stop()


async def test_recovery_while_waiters_leave_keeps_the_loop_alive(backend: Backend) -> None:
    """Waiters cancelled while recovery re-queues them: recovery must not trip over them."""
    config = make_config(limit=1)
    ctrl = FlowController(backend.store(config))
    await ctrl.start(loops=False)
    try:
        holder = await ctrl.enqueue_and_wait(req("h"))
        tasks = [asyncio.create_task(ctrl.enqueue_and_wait(req(f"q{i}"))) for i in range(6)]
        await eventually(lambda: ctrl.waiting == 6)
        await backend.client().flushall()  # Redis restarted empty
        recovering = asyncio.create_task(ctrl.heartbeat())
        await asyncio.sleep(0)
        for t in tasks[::2]:
            t.cancel()
        await recovering  # no KeyError
        await ctrl.release(holder.item_id)
        for t in tasks[1::2]:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await eventually(lambda: ctrl.waiting == 0)
        await ctrl.maintain(force=True)
        assert ctrl.held == 0
    finally:
        await ctrl.stop()


# 4 ---------------------------------------------------------------------------------------------


async def test_requeued_waiter_on_the_fast_path_is_not_enqueued_twice(backend: Backend) -> None:
    clock = [1_000_000]
    config = make_config(limit=1, redis={"recoveryHold": "0s"})
    ctrl = FlowController(backend.store(config), clock=lambda: clock[0])
    await ctrl.start(loops=False)
    try:
        holder = await ctrl.enqueue_and_wait(req("h"))
        waiting = asyncio.create_task(ctrl.enqueue_and_wait(req("q")))
        await eventually(lambda: ctrl.waiting == 1)
        await backend.client().flushall()
        await ctrl.release(holder.item_id)  # finds no config: recovery runs first
        admitted = await asyncio.wait_for(waiting, 10)
        assert admitted.outcome is Outcome.DISPATCHED
        await ctrl.release(admitted.item_id)
        assert (await stats(ctrl))["inflight"] == 0
        assert ctrl.held == 0
    finally:
        await ctrl.stop()


# 5 ---------------------------------------------------------------------------------------------


async def test_no_admission_after_a_restart_until_holdings_are_counted(backend: Backend) -> None:
    clock = [1_000_000]
    # Loops that only listen to the inbox: heartbeats and maintenance are driven by the test.
    slow = {"heartbeatInterval": "1h", "leaseTimeout": "2h", "maintenanceInterval": "1h"}
    config = make_config(limit=2, redis={"recoveryHold": "2s", **slow})
    a = FlowController(backend.store(config, "a"), clock=lambda: clock[0])
    b = FlowController(backend.store(config, "b"), clock=lambda: clock[0])
    await a.start(loops=False)
    await b.start(loops=False)
    try:
        held_a = await a.enqueue_and_wait(req("a1"))
        held_b = await b.enqueue_and_wait(req("b1"))
        assert held_a.admitted and held_b.admitted
        await backend.client().flushall()
        clock[0] += 10
        # A learns of the loss from its own request; B only at its next heartbeat.
        newcomer = asyncio.create_task(a.enqueue_and_wait(req("a2")))
        await eventually(lambda: a.waiting == 1)
        assert (await stats(a))["inflight"] == 1  # A's held slot is back, nothing admitted
        clock[0] += 500
        await b.heartbeat()
        assert (await stats(a))["inflight"] == 2
        clock[0] += 5_000  # the hold is over: still no free slot
        await a.maintain(force=True)
        assert not newcomer.done()
        assert (await stats(a))["inflight"] == 2
        a.start_loops()  # B's release wakes A's waiter through A's inbox
        await b.release(held_b.item_id)
        admitted = await asyncio.wait_for(newcomer, 10)
        assert admitted.outcome is Outcome.DISPATCHED
        assert (await stats(a))["inflight"] == 2
        await a.release(held_a.item_id)
        await a.release(admitted.item_id)
        assert (await stats(a))["inflight"] == 0
    finally:
        await a.stop()
        await b.stop()


async def test_tickets_are_re_registered_after_a_restart(backend: Backend) -> None:
    clock = [1_000_000]
    config = make_config(limit=2, redis={"recoveryHold": "1s"})
    ctrl = FlowController(backend.store(config), clock=lambda: clock[0])
    await ctrl.start(loops=False)
    try:
        t1 = await ctrl.enqueue_and_wait(req("t1"), lease_ms=60_000)
        t2 = await ctrl.enqueue_and_wait(req("t2"), lease_ms=60_000)
        assert t1.admitted and t2.admitted
        await backend.client().flushall()
        clock[0] += 10
        await ctrl.heartbeat()
        assert (await stats(ctrl))["inflight"] == 2
        clock[0] += 2_000
        late = asyncio.create_task(ctrl.enqueue_and_wait(req("t3"), lease_ms=60_000))
        await eventually(lambda: ctrl.waiting == 1)
        await ctrl.maintain(force=True)
        assert not late.done()  # the live tickets still hold both slots
        await ctrl.release(t1.item_id)
        admitted = await asyncio.wait_for(late, 10)
        assert admitted.admitted
        assert (await stats(ctrl))["inflight"] == 2
    finally:
        await ctrl.stop()


# A replica whose lease lapsed ------------------------------------------------------------------


async def test_a_replica_that_cannot_renew_its_lease_aborts_what_it_holds(
    backend: Backend,
) -> None:
    config = make_config(limit=1, redis={"leaseTimeout": "300ms", "heartbeatInterval": "100ms"})
    ctrl = FlowController(backend.store(config))
    await ctrl.start(loops=False)
    stalled = asyncio.Event()

    async def stall(
        lease_ms: int, now: int | None = None, owned: int | None = None, direct: bool = False
    ) -> Any:
        await stalled.wait()  # Redis does not answer (never set: the call hangs)

    try:
        held = await ctrl.enqueue_and_wait(req("h"))
        lost = asyncio.Event()
        ctrl.watch(held.item_id, lost.set)
        ctrl.store.heartbeat = stall  # type: ignore[method-assign]
        ctrl.start_loops()
        await asyncio.wait_for(lost.wait(), 10)
        assert ctrl.held == 0 and ctrl.lapses == 1
    finally:
        await ctrl.stop()


@dataclass
class HolderAndWaiter:
    """Replica A holds the only slot and has a request waiting behind it; B is alive beside it.
    Both run on one virtual clock, without their background loops."""

    clock: list[int]
    a: FlowController
    b: FlowController
    held: Admission
    waiting: asyncio.Task[Admission]

    async def b_reclaims_a(self) -> None:
        """A was paused past its lease: B's heartbeat and maintenance take back A's slot."""
        self.clock[0] += 5_000
        await self.b.heartbeat()
        await self.b.maintain(force=True)
        assert (await stats(self.b))["inflight"] == 0


@contextlib.asynccontextmanager
async def holder_and_waiter(
    backend: Backend, waiter_ttl_ms: int = 30_000
) -> AsyncIterator[HolderAndWaiter]:
    clock = [1_000_000]
    config = make_config(limit=1, redis={"leaseTimeout": "1s", "heartbeatInterval": "200ms"})
    a = FlowController(backend.store(config, "a"), clock=lambda: clock[0])
    b = FlowController(backend.store(config, "b"), clock=lambda: clock[0])
    await a.start(loops=False)
    await b.start(loops=False)
    try:
        held = await a.enqueue_and_wait(req("h"))
        waiting = asyncio.create_task(a.enqueue_and_wait(req("q", ttl_ms=waiter_ttl_ms)))
        await eventually(lambda: a.waiting == 1)
        yield HolderAndWaiter(clock, a, b, held, waiting)
    finally:
        await a.stop()
        await b.stop()


async def test_a_reclaimed_replica_aborts_its_slots_and_requeues_its_waiters(
    backend: Backend,
) -> None:
    async with holder_and_waiter(backend) as run:
        a = run.a
        lost = asyncio.Event()
        a.watch(run.held.item_id, lost.set)
        await run.b_reclaims_a()
        await a.heartbeat()  # A wakes: the pool no longer knows it
        assert lost.is_set()
        admitted = await asyncio.wait_for(run.waiting, 10)  # re-queued, and the slot is free
        assert admitted.outcome is Outcome.DISPATCHED
        assert a.held == 1 and admitted.item_id != run.held.item_id
        await a.release(admitted.item_id)
        assert (await stats(a))["inflight"] == 0


async def test_a_dispatch_read_after_the_lease_lapsed_waits_for_the_pool_to_confirm(
    backend: Backend,
) -> None:
    # Found by the chaos run (overshoot during a pause with 0 slots held at SIGSTOP): A's release
    # dispatched A's own waiter, and A was paused with that reply unread. While it slept its
    # lease lapsed and B reclaimed the slot. Read on waking, the dispatch must not be used before
    # a heartbeat says whether the pool still knows A.
    async with holder_and_waiter(backend) as run:
        a = run.a
        sink, unread = a.store.sink, list[Delivery]()
        a.store.sink = unread.extend  # the reply waits in A's socket
        await a.release(run.held.item_id)
        a.store.sink = sink
        assert [d.status for d in unread] == [contract.ScriptStatus.DISPATCHED]
        await run.b_reclaims_a()  # A sleeps past its lease; B reclaims the slot it was given
        # A judges its lease by its own loop's time, which ran on while it slept.
        a._last_beat = asyncio.get_running_loop().time() - 10
        sink(unread)  # A wakes and reads the reply
        assert a.held == 0  # not admitted on a slot the pool took back
        await a.heartbeat()  # the pool no longer knows A: the request takes a new place
        admitted = await asyncio.wait_for(run.waiting, 10)
        assert admitted.outcome is Outcome.DISPATCHED
        assert admitted.item_id != unread[0].item_id
        assert a.held == 1 and (await stats(a))["inflight"] == 1


async def test_a_release_never_overtakes_a_reconcile_that_lists_its_slot(backend: Backend) -> None:
    """Reconcile puts back held slots the pool lost; a release sent after its list was taken
    but run before it would be undone (the slot counted again, over the limit). Found by
    tests/test_two_replicas.py on a loaded machine."""
    ctrl = FlowController(backend.store(make_config(limit=1)))
    await ctrl.start(loops=False)
    real = ctrl.store.reconcile
    go = asyncio.Event()
    releases_sent: list[str] = []
    real_submit = ctrl.store.submit_release

    async def slow_reconcile(*args: Any, **kwargs: Any) -> Any:
        await go.wait()  # the reconcile is "on the wire"
        return await real(*args, **kwargs)

    def recording_submit(
        item_id: str, now: int | None = None, *, held: tuple[str, int] | None = None
    ) -> Any:
        releases_sent.append(item_id)
        return real_submit(item_id, now=now, held=held)

    ctrl.store.reconcile = slow_reconcile  # type: ignore[method-assign]
    ctrl.store.submit_release = recording_submit  # type: ignore[method-assign]
    try:
        held = await ctrl.enqueue_and_wait(req("h"))
        reconciling = asyncio.create_task(ctrl._reconcile())
        await asyncio.sleep(0)  # its list of held slots is taken
        releasing = asyncio.create_task(ctrl.release(held.item_id))
        for _ in range(20):
            await asyncio.sleep(0)  # loop turns: an ungated release would be submitted by now
        assert releases_sent == []  # held back while the reconcile runs
        go.set()
        await reconciling
        assert await releasing
        assert releases_sent == [held.item_id]
        assert (await stats(ctrl))["inflight"] == 0
    finally:
        await ctrl.stop()


@pytest.mark.parametrize("reclaimed", [False, True], ids=["pool-knows-a", "reclaimed"])
async def test_a_dispatch_found_by_the_ttl_cancel_while_the_lease_is_in_doubt_waits_for_the_pool(
    backend: Backend, reclaimed: bool
) -> None:
    """Found by the chaos run (a 500 with no outcome header, during a pause): the request's TTL
    ran out here while its dispatch's wake-up was unread, so the TTL cancel found the item in
    flight; with the replica's lease in doubt the dispatch waits for a heartbeat
    (FlowController.defer_if_lease_in_doubt), and the request took the outcome it did not have
    yet (InvalidStateError). It waits for the heartbeat: if the pool still knows the replica the
    request goes with the slot; if it reclaimed the replica, the request's TTL has run out."""
    async with holder_and_waiter(backend, waiter_ttl_ms=200) as run:
        a, waiting = run.a, run.waiting
        sink, unread = a.store.sink, list[Delivery]()
        a.store.sink = unread.extend  # the dispatch's wake-up waits in A's socket
        await a.release(run.held.item_id)
        a.store.sink = sink
        assert [d.status for d in unread] == [contract.ScriptStatus.DISPATCHED]
        a._last_beat = asyncio.get_running_loop().time() - 10  # A slept past its lease
        # The TTL (200 ms on A's loop) runs out: its cancel finds the item in flight.
        await eventually(lambda: len(a._deferred) == 1 or waiting.done())
        assert not waiting.done()
        if reclaimed:
            await run.b_reclaims_a()
        await a.heartbeat()
        admitted = await asyncio.wait_for(waiting, 10)
        if reclaimed:
            assert admitted.outcome is Outcome.EVICTED_TTL and a.held == 0
        else:
            assert admitted.outcome is Outcome.DISPATCHED
            assert admitted.item_id == unread[0].item_id and a.held == 1
            await a.release(admitted.item_id)
        await eventually(lambda: not a._background)  # the reclaimed slot's release, if any
        assert (await stats(a))["inflight"] == 0
