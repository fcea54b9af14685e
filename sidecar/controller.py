"""The flow controller: admits requests through the pool's shared queues and waits for an outcome.

Each replica runs one. It owns no pool state: the queues, the capacity budget and the registry live
in the store; the controller holds only the futures of its own waiting requests and the ids of the
slots it holds (so it can put them back if Redis loses them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec

from sidecar.errors import StoreError
from sidecar.keys import escape_id, key_id
from sidecar.outcome import STATUS_OUTCOME, Outcome, ScriptStatus
from sidecar.request import DEFAULT_FLOW, FlowControlRequest
from sidecar.store.pool import Delivery, PoolStore, ScriptReply

log = logging.getLogger(__name__)

# Deliveries that arrive before their waiter is registered (the inbox can outrun the enqueue reply).
_EARLY_LIMIT = 10_000
_INBOX_BLOCK_S = 1.0
_RETRY_BACKOFF_S = 0.5


class Admission(msgspec.Struct, frozen=True):
    """The outcome of one request. ``item_id`` names the slot to release when dispatched."""

    outcome: Outcome
    item_id: str = ""
    wait_ms: int = 0

    @property
    def admitted(self) -> bool:
        return self.outcome is Outcome.DISPATCHED


OutcomeHook = Callable[[FlowControlRequest, Admission], None]


class FlowController:
    """``enqueue_and_wait`` admits; ``release`` frees the slot; loops keep the replica alive."""

    def __init__(
        self,
        store: PoolStore,
        *,
        clock: Callable[[], int | None] = lambda: None,
        on_outcome: OutcomeHook | None = None,
    ) -> None:
        self.store = store
        self.config = store.config
        # Absolute ms passed to every script; None = Redis TIME. Tests inject a virtual clock.
        self._clock = clock
        self._on_outcome = on_outcome
        self._waiters: dict[str, asyncio.Future[Delivery]] = {}
        # Queued requests by item id, so recovery can put them back in the queue.
        self._pending: dict[str, Pending] = {}
        self._early: OrderedDict[str, Delivery] = OrderedDict()
        # Slots held by this replica: item id -> escaped workload id (for re-registration).
        self._held: dict[str, str] = {}
        # Releases and cancels that failed (store unreachable); retried on each heartbeat.
        self._unreleased: set[str] = set()
        self._abandoned: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        # Clean-ups that outlive the request that started them (kept referenced until done).
        self._background: set[asyncio.Task[None]] = set()
        self._registered = False

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def start(self, *, loops: bool = True) -> None:
        """Writes the pool configuration, registers the replica and starts its loops."""
        await self.store.configure(self._clock())
        await self.heartbeat()
        if loops:
            self.start_loops()

    def start_loops(self) -> None:
        """Inbox listener, heartbeat and maintenance; each survives store errors and retries."""
        redis = self.config.redis
        self._tasks = [
            asyncio.create_task(self._inbox_loop(), name="inbox"),
            asyncio.create_task(self._every(redis.heartbeat_interval, self.heartbeat)),
            asyncio.create_task(self._every(redis.maintenance_interval, self.maintain)),
        ]

    async def stop(self, *, deregister: bool = False) -> None:
        """Stops the loops. ``deregister`` ends the replica's lease now, so the others reclaim
        whatever it still holds at their next maintenance instead of after the lease timeout."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_result(Delivery("", ScriptStatus.EVICTED_OTHER, 0))
        if deregister:
            with contextlib.suppress(StoreError):
                await self.store.heartbeat(0, now=self._clock())

    # Admission ------------------------------------------------------------------------------------

    async def enqueue_and_wait(
        self, request: FlowControlRequest, *, lease_ms: int = 0
    ) -> Admission:
        """Blocks until the request is dispatched or gets another outcome.

        Cancelling the awaiting task takes the request out of the queue (``evicted_cancelled``);
        if it was dispatched in that instant, the slot is released at once. Raises StoreError if
        the store cannot be reached.
        """
        pending = await self.submit(request, lease_ms=lease_ms)
        return await pending.result()

    async def submit(self, request: FlowControlRequest, *, lease_ms: int = 0) -> Pending:
        """Enqueues (one script call) and returns without waiting for the outcome.

        When this returns, the request holds its place in the pool's order. ``lease_ms`` > 0 makes
        the slot a lease that expires unless renewed (for tickets held outside this replica).
        """
        deadline = asyncio.get_running_loop().time() + request.ttl_ms / 1000
        pending = Pending(self, request, lease_ms, deadline)
        await pending.enqueue()
        return pending

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _undo(self, enqueue: asyncio.Future[ScriptReply]) -> None:
        """The caller went away while its enqueue was on the wire: undo what the script did."""
        try:
            reply = await enqueue
        except (StoreError, asyncio.CancelledError):
            return
        if reply.status is ScriptStatus.QUEUED:
            await self._cancel(reply.item_id)
        elif reply.status is ScriptStatus.DISPATCHED:
            with contextlib.suppress(StoreError):
                await self.release(reply.item_id)

    def _settle(self, delivery: Delivery, workload: str, lease_ms: int) -> Admission | None:
        if delivery.status is ScriptStatus.NOT_FOUND:
            return None
        if delivery.status is ScriptStatus.DISPATCHED:
            return self._admitted(delivery.item_id, workload, delivery.wait_ms, lease_ms)
        return Admission(STATUS_OUTCOME[delivery.status], delivery.item_id, delivery.wait_ms)

    def _register(self, item_id: str) -> asyncio.Future[Delivery]:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[item_id] = waiter
        if (early := self._early.pop(item_id, None)) is not None:
            waiter.set_result(early)
        return waiter

    def _admitted(self, item_id: str, workload: str, wait_ms: int, lease_ms: int) -> Admission:
        if lease_ms == 0:
            self._held[item_id] = workload
        return Admission(Outcome.DISPATCHED, item_id, wait_ms)

    async def _expire(
        self, item_id: str, workload: str, lease_ms: int, waiter: asyncio.Future[Delivery]
    ) -> Admission:
        try:
            reply = await self.store.cancel(item_id, ScriptStatus.EVICTED_TTL, now=self._clock())
        except StoreError:
            self._abandoned.add(item_id)
            raise
        self._deliver(reply.deliveries)
        if reply.status is ScriptStatus.DISPATCHED:
            # Dispatched while the timer fired: the slot is ours, so the request may still go.
            wait = waiter.result().wait_ms if waiter.done() else 0
            return self._admitted(item_id, workload, wait, lease_ms)
        if waiter.done() and waiter.result().status is not ScriptStatus.NOT_FOUND:
            settled = self._settle(waiter.result(), workload, lease_ms)
            if settled is not None:
                return settled
        # Removed here, or already by another replica's maintenance (its wake-up is still on the
        # way): either way the request outlived its TTL.
        return Admission(Outcome.EVICTED_TTL, item_id, 0)

    async def _cancel(self, item_id: str) -> None:
        try:
            reply = await self.store.cancel(
                item_id, ScriptStatus.EVICTED_CANCELLED, now=self._clock()
            )
        except StoreError:
            log.warning("could not cancel %s; retrying on the next heartbeat", item_id)
            self._abandoned.add(item_id)
            return
        self._abandoned.discard(item_id)
        self._held.pop(item_id, None)
        self._deliver(reply.deliveries)

    async def release(self, item_id: str) -> bool:
        """Frees a dispatched slot; False if it was already free. Idempotent.

        If the store cannot be reached, the release is kept and retried on every heartbeat until
        it succeeds (a lost release would hold a slot of the global budget forever)."""
        self._held.pop(item_id, None)
        try:
            reply = await self.store.release(item_id, now=self._clock())
        except (StoreError, asyncio.CancelledError):
            # Cancelled mid-call (the client went away): the release may or may not have run.
            # Retrying is safe (idempotent) and cheaper than shielding every release in a Task.
            self._unreleased.add(item_id)
            raise
        self._unreleased.discard(item_id)
        self._deliver(reply.deliveries)
        return reply.status is ScriptStatus.DISPATCHED

    async def _retry_releases(self) -> None:
        for item_id in sorted(self._unreleased):
            await self.release(item_id)
        # Requests whose caller is gone but whose cancel failed: cancelling again also frees the
        # slot if the item was dispatched meanwhile, so nobody holds a slot no caller will use.
        for item_id in sorted(self._abandoned):
            await self._cancel(item_id)

    async def renew(self, item_id: str, lease_ms: int) -> bool:
        return await self.store.renew(item_id, lease_ms, now=self._clock())

    def _report(self, request: FlowControlRequest, admission: Admission) -> None:
        if self._on_outcome is not None:
            self._on_outcome(request, admission)

    # Deliveries and loops ----------------------------------------------------------------------

    def _deliver(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            waiter = self._waiters.get(delivery.item_id)
            if waiter is not None:
                if not waiter.done():
                    waiter.set_result(delivery)
                continue
            self._early[delivery.item_id] = delivery
            if len(self._early) > _EARLY_LIMIT:
                self._early.popitem(last=False)

    async def heartbeat(self) -> None:
        lease_ms = round(self.config.redis.lease_timeout * 1000)
        known = await self.store.heartbeat(lease_ms, now=self._clock())
        if not known and self._registered:
            await self._recover()
        self._registered = True
        await self._retry_releases()

    async def _recover(self) -> None:
        """The store forgot this replica (Redis restarted, or a stall outlived the lease)."""
        log.warning(
            "pool state lost for replica %s: re-registering %d held slots, re-queueing %d waiters",
            self.store.replica_id,
            len(self._held),
            len(self._waiters),
        )
        if self._held:
            await self.store.reregister(list(self._held.items()), now=self._clock())
        # Waiters take new places in their original order; their tasks then wait on the new ids.
        for item_id in sorted(self._pending):
            pending = self._pending.pop(item_id)
            old = self._waiters.get(item_id)
            await pending.enqueue()
            if old is not None and not old.done():
                old.set_result(Delivery(item_id, ScriptStatus.NOT_FOUND, 0))

    async def maintain(self, *, force: bool = False) -> None:
        interval_ms = round(self.config.redis.maintenance_interval * 1000)
        self._deliver(await self.store.maintain(interval_ms, force=force, now=self._clock()))

    async def _inbox_loop(self) -> None:
        while True:
            try:
                self._deliver(await self.store.pop_inbox(_INBOX_BLOCK_S))
            except StoreError as exc:
                log.warning("inbox: %s", exc)
                await asyncio.sleep(_RETRY_BACKOFF_S)

    async def _every(self, interval_s: float, step: Callable[[], object]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                result = step()
                if asyncio.iscoroutine(result):
                    await result
            except StoreError as exc:
                log.warning("%s: %s", getattr(step, "__name__", "loop"), exc)


class Pending:
    """A submitted request. ``result`` waits for its outcome (once)."""

    def __init__(
        self,
        controller: FlowController,
        request: FlowControlRequest,
        lease_ms: int,
        deadline: float,
    ) -> None:
        self._ctrl = controller
        self.request = request
        self._lease_ms = lease_ms
        self._deadline = deadline
        self._workload = key_id(request.workload_id)
        self.item_id = ""
        self.admission: Admission | None = None
        self._waiter: asyncio.Future[Delivery] | None = None

    async def enqueue(self) -> None:
        ctrl = self._ctrl
        remaining_ms = max(int((self._deadline - asyncio.get_running_loop().time()) * 1000), 1)
        call = asyncio.ensure_future(
            ctrl.store.enqueue(
                band=self.request.priority,
                flow=key_id(self.request.fairness_id, escape_id(DEFAULT_FLOW)),
                workload=self._workload,
                criticality=self.request.criticality,
                byte_size=self.request.byte_size,
                ttl_ms=remaining_ms,
                lease_ms=self._lease_ms,
                now=ctrl._clock(),
            )
        )
        try:
            reply = await asyncio.shield(call)
        except asyncio.CancelledError:
            ctrl._spawn(ctrl._undo(call))
            raise
        ctrl._deliver(reply.deliveries)
        self.item_id = reply.item_id
        if reply.status is ScriptStatus.DISPATCHED:
            self.admission = ctrl._admitted(
                reply.item_id, self._workload, int(reply.detail or 0), self._lease_ms
            )
        elif reply.status is ScriptStatus.QUEUED:
            self._waiter = ctrl._register(reply.item_id)
            ctrl._pending[reply.item_id] = self
        else:
            self.admission = Admission(STATUS_OUTCOME.get(reply.status, Outcome.REJECTED_OTHER))

    async def result(self) -> Admission:
        while self.admission is None:
            waiter = self._waiter
            outcome = await self._wait()
            if outcome is not None:
                self.admission = outcome
            elif self._waiter is waiter:
                # The store lost the item and recovery did not re-queue it: do it here.
                await self.enqueue()
        self._ctrl._report(self.request, self.admission)
        return self.admission

    async def _wait(self) -> Admission | None:
        ctrl, item_id, waiter = self._ctrl, self.item_id, self._waiter
        assert waiter is not None
        try:
            async with asyncio.timeout_at(self._deadline):
                delivery = await asyncio.shield(waiter)
        except TimeoutError:
            return await ctrl._expire(item_id, self._workload, self._lease_ms, waiter)
        except asyncio.CancelledError:
            await asyncio.shield(ctrl._cancel(item_id))
            raise
        finally:
            ctrl._waiters.pop(item_id, None)
            ctrl._pending.pop(item_id, None)
        return ctrl._settle(delivery, self._workload, self._lease_ms)
