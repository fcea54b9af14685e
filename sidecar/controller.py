"""The flow controller: admits requests through the pool's shared queues and waits for an outcome.

Each replica runs one. It owns no pool state: the queues, the capacity budget and the registry live
in the store. It keeps only what lets it keep its promises through faults: its waiting requests
(so they can be re-queued if Redis loses them), the slots it holds and the tickets it issued (so
they are counted again before anything new is admitted), and releases it still owes.

Rules this module keeps (DESIGN.md §7):
- store calls run in tasks the store owns and every reply's outcomes reach their requests through
  the store's sink, so a caller cancelled mid-call loses nothing but its own wait;
- state is re-read after every await; background loops survive every exception;
- a replica whose lease lapsed (paused, partitioned) stops using the slots it held as soon as it
  can tell: locally when it has not renewed its lease for ``leaseTimeout``, or when a heartbeat
  finds that the pool reclaimed it; a dispatch it learns of while the lease is in doubt (from the
  inbox or from any reply) waits for a heartbeat (``defer_if_lease_in_doubt``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from sidecar.detector import make_scraper
from sidecar.errors import StoreError
from sidecar.keys import escape_id, key_id
from sidecar.lifecycle import Admission, Pending
from sidecar.outcome import Outcome, ScriptStatus
from sidecar.request import DEFAULT_FLOW, FlowControlRequest
from sidecar.store.pool import Delivery, PoolStore, ScriptReply

__all__ = ["Admission", "FlowController", "OutcomeHook", "Pending"]

log = logging.getLogger(__name__)

# Deliveries that arrive before their waiter is registered (the inbox can outrun the enqueue reply).
_EARLY_LIMIT = 10_000
_INBOX_BLOCK_S = 1.0
_RETRY_BACKOFF_S = 0.5
# How often the replica checks its own lease (a paused replica notices within this after waking).
_WATCHDOG_S = 0.1
# Requests without a valid fairness id share the default flow (escaped once, not per request).
_DEFAULT_FLOW_KEY = escape_id(DEFAULT_FLOW)
# Escaped ids remembered per replica: it sees the same few workload and flow ids over and over.
_KEY_ID_CACHE = 10_000

OutcomeHook = Callable[[FlowControlRequest, Admission], None]
# (request, outcome or None when left queued, seconds the enqueue call took)
EnqueueHook = Callable[[FlowControlRequest, Outcome | None, float], None]


class _KeyIds:
    """``sidecar.keys.key_id`` with one fallback, remembered (validating and escaping an id costs
    more than the lookup; the cache starts over when full, so it stays bounded)."""

    __slots__ = ("_fallback", "_known")

    def __init__(self, fallback: str) -> None:
        self._fallback = fallback
        self._known: dict[str, str] = {}

    def __call__(self, value: str) -> str:
        known = self._known.get(value)
        if known is None:
            known = key_id(value, self._fallback)
            if len(self._known) >= _KEY_ID_CACHE:
                self._known.clear()
            self._known[value] = known
        return known


@dataclass
class _Hold:
    """A slot this replica holds for a request it forwards."""

    workload: str
    tokens: int = 0
    # Called when the replica loses the slot (its lease lapsed): stops the forwarding.
    on_lost: Callable[[], object] | None = None


@dataclass
class _Ticket:
    """A slot held outside the replica (admission API, gateway check) that it issued or renewed."""

    workload: str
    expires: float  # event-loop time
    tokens: int = 0


class FlowController:
    """``enqueue_and_wait`` admits; ``release`` frees the slot; loops keep the replica alive."""

    def __init__(
        self,
        store: PoolStore,
        *,
        clock: Callable[[], int | None] = lambda: None,
        on_outcome: OutcomeHook | None = None,
        on_enqueued: EnqueueHook | None = None,
    ) -> None:
        self.store = store
        self.on_enqueued = on_enqueued
        self.config = store.config
        # Absolute ms passed to every script; None = Redis TIME. Tests inject a virtual clock.
        self._clock = clock
        self._on_outcome = on_outcome
        self.workload_key = _KeyIds("")
        self._flow_key = _KeyIds(_DEFAULT_FLOW_KEY)
        store.sink = self._deliver
        store.on_lost = self._recover_from_loss
        # Requests queued in the pool by this replica, by item id.
        self._queued: dict[str, Pending] = {}
        self._order = itertools.count()
        self._early: OrderedDict[str, Delivery] = OrderedDict()
        self._held: dict[str, _Hold] = {}
        self._tickets: dict[str, _Ticket] = {}
        # Releases and cancels that failed (store unreachable); retried on each heartbeat.
        self._unreleased: set[str] = set()
        self._abandoned: set[str] = set()
        # Inbox wake-ups that arrived while this replica's lease may have lapsed: applied or
        # dropped once a heartbeat says whether the pool still knows the replica.
        self._deferred: list[Delivery] = []
        self._tasks: list[asyncio.Task[None]] = []
        # Clean-ups that outlive the request that started them (kept referenced until done).
        self._background: set[asyncio.Task[None]] = set()
        # The utilization detector's scraper (None under the concurrency detector).
        self.scraper = make_scraper(store, self._clock)
        self._calls: set[asyncio.Future[Any]] = set()
        self._recovery: asyncio.Future[None] | None = None
        self._reconciling: asyncio.Future[Any] | None = None
        self._registered = False
        self._epoch: int | None = None
        self._last_beat: float | None = None  # loop time at which the last renewed lease began
        self._lease_lost = False
        self._stopping = False
        self.loop_errors = 0
        self.lapses = 0
        self.recoveries = 0

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def waiting(self) -> int:
        """Requests of this replica queued in the pool."""
        return len(self._queued)

    @property
    def lease_ms(self) -> int:
        return round(self.config.redis.lease_timeout * 1000)

    async def start(self, *, loops: bool = True) -> None:
        """Writes the pool configuration, registers the replica and starts its loops."""
        await self.store.configure(self._clock())
        self._epoch = self.store.epoch
        await self.heartbeat()
        if loops:
            self.start_loops()

    def start_loops(self) -> None:
        """Inbox listener, heartbeat, maintenance and the lease watchdog; each survives every
        exception and retries."""
        redis = self.config.redis
        self._stopping = False
        self._tasks = [
            asyncio.create_task(self._inbox_loop(), name="inbox"),
            asyncio.create_task(self._every(redis.heartbeat_interval, self.heartbeat)),
            asyncio.create_task(self._every(redis.maintenance_interval, self.maintain)),
            asyncio.create_task(self._every(_WATCHDOG_S, self._watch_lease)),
        ]
        if self.scraper is not None:
            self._tasks.append(asyncio.create_task(self.scraper.run(), name="scraper"))

    async def stop(self, *, deregister: bool = False) -> None:
        """Stops the loops. ``deregister`` ends the replica's lease now, so the others reclaim
        whatever it still holds at their next maintenance instead of after the lease timeout."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self.scraper is not None:
            # Hands the scrape lease over at once (another replica scrapes within ~50 ms).
            await self.scraper.aclose()
        # Enqueues still on the wire, then the clean-ups their replies may start.
        while self._calls or self._background:
            await asyncio.gather(*self._calls, *self._background, return_exceptions=True)
        for pending in list(self._queued.values()):
            pending.settle(Admission(Outcome.EVICTED_OTHER, pending.item_id))
        self._queued.clear()
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
        if self._recovery is not None and not self._recovery.done():
            # Waiting requests are being re-queued: newcomers go behind them.
            with contextlib.suppress(StoreError):
                await asyncio.shield(self._recovery)
        loop = asyncio.get_running_loop()
        pending = Pending(
            self, request, lease_ms, loop.time() + request.ttl_ms / 1000, next(self._order)
        )
        await pending.enqueued(self.start_enqueue(pending))
        return pending

    # What Pending asks of its controller (sidecar/lifecycle.py) ---------------------------------

    def start_enqueue(self, pending: Pending, *, direct: bool = False) -> asyncio.Future[Any]:
        """Sends ``pending``'s enqueue with its remaining TTL; the reply goes to the pending."""
        request = pending.request
        loop_time = asyncio.get_running_loop().time()
        remaining_ms = max(int((pending.deadline - loop_time) * 1000), 1)
        call = self.store.submit_enqueue(
            band=request.priority,
            flow=self._flow_key(request.fairness_id),
            workload=pending.workload,
            criticality=request.criticality,
            byte_size=request.byte_size,
            ttl_ms=remaining_ms,
            tokens=request.tokens,
            # The objective counts from the request's first enqueue (a re-queue after a Redis
            # loss keeps its place by it), as the TTL does.
            slo_ms=max(remaining_ms - request.ttl_ms + request.slo_ttft_ms, 1)
            if request.slo_ttft_ms
            else 0,
            lease_ms=pending.lease_ms,
            now=self._clock(),
            direct=direct,
        )
        pending.sent_at = loop_time
        call.add_done_callback(pending.on_enqueue_reply)
        self._calls.add(call)
        call.add_done_callback(self._calls.discard)
        return call

    def track_queued(self, pending: Pending) -> Delivery | None:
        """Registers a queued request; returns a wake-up that arrived before its enqueue reply."""
        self._queued[pending.item_id] = pending
        return self._early.pop(pending.item_id, None)

    def untrack(self, pending: Pending, item_id: str) -> None:
        if self._queued.get(item_id) is pending:
            del self._queued[item_id]

    def hold(self, item_id: str, workload: str, lease_ms: int, tokens: int = 0) -> None:
        """Records a slot this replica was given: its own (lease 0) or a ticket's."""
        if lease_ms == 0:
            self._held[item_id] = _Hold(workload, tokens)
        else:
            expires = asyncio.get_running_loop().time() + lease_ms / 1000
            self._tickets[item_id] = _Ticket(workload, expires, tokens)

    def watch(self, item_id: str, on_lost: Callable[[], object]) -> None:
        """``on_lost`` runs if the replica loses the held slot (its lease lapsed)."""
        hold = self._held.get(item_id)
        if hold is not None:
            hold.on_lost = on_lost

    def report(self, request: FlowControlRequest, admission: Admission) -> None:
        if self._on_outcome is not None:
            self._on_outcome(request, admission)

    def cancel_later(self, item_id: str) -> asyncio.Task[None]:
        """Takes a queued item out in the background (its caller is gone)."""
        return self._spawn(self._cancel(item_id))

    def release_later(self, item_id: str) -> asyncio.Task[None]:
        """Frees a slot nobody will use, in the background (retried until the store answers)."""
        self._held.pop(item_id, None)
        self._tickets.pop(item_id, None)
        return self._spawn(self._release_quietly(item_id))

    async def expire(self, item_id: str) -> ScriptReply:
        """Takes a queued item out because its TTL ran out here; on failure, retried later."""
        try:
            return await self.store.cancel(item_id, ScriptStatus.EVICTED_TTL, now=self._clock())
        except StoreError:
            self._abandoned.add(item_id)
            raise

    def elapsed_ms(self, pending: Pending) -> int:
        loop_time = asyncio.get_running_loop().time()
        return max(int((loop_time - (pending.deadline - pending.request.ttl_ms / 1000)) * 1000), 0)

    # Releases ------------------------------------------------------------------------------------

    async def release(self, item_id: str) -> bool:
        """Frees a dispatched slot; False if it was already free. Idempotent.

        The release runs to the end even if the caller is cancelled (its reply may dispatch this
        replica's waiting requests). If the store cannot be reached, it is kept and retried on
        every heartbeat until it succeeds: a lost release would hold a slot forever."""
        hold = self._held.pop(item_id, None)
        self._tickets.pop(item_id, None)
        # What it was enqueued with saves the pool reading the slot's record. A retry (the slot
        # is no longer in _held) goes without: the pool reads the record then.
        held = None if hold is None else (hold.workload, hold.tokens)
        call: asyncio.Future[ScriptReply]
        if self._reconciling is not None and not self._reconciling.done():
            # A reconcile listing this slot as held is on the wire: a release that overtook it
            # would be undone (the slot put back). Send it once the reconcile ran (a task: it
            # goes even if this caller is cancelled meanwhile).
            call = asyncio.ensure_future(self._release_after(self._reconciling, item_id))
        else:
            call = self.store.submit_release(item_id, now=self._clock(), held=held)
        call.add_done_callback(functools.partial(self._release_done, item_id))
        reply = await asyncio.shield(call)
        return reply.status is ScriptStatus.DISPATCHED

    async def _release_after(self, before: asyncio.Future[None], item_id: str) -> ScriptReply:
        with contextlib.suppress(Exception):
            await asyncio.shield(before)
        return await asyncio.shield(self.store.submit_release(item_id, now=self._clock()))

    def _release_done(self, item_id: str, call: asyncio.Future[ScriptReply]) -> None:
        if call.cancelled() or call.exception() is not None:
            self._unreleased.add(item_id)
        else:
            self._unreleased.discard(item_id)

    async def _release_quietly(self, item_id: str) -> None:
        with contextlib.suppress(StoreError):
            await self.release(item_id)

    async def _cancel(self, item_id: str) -> None:
        try:
            await self.store.cancel(item_id, ScriptStatus.EVICTED_CANCELLED, now=self._clock())
        except StoreError:
            log.warning("could not cancel %s; retrying on the next heartbeat", item_id)
            self._abandoned.add(item_id)
            return
        self._abandoned.discard(item_id)

    async def _retry_releases(self) -> None:
        for item_id in sorted(self._unreleased):
            await self.release(item_id)
        # Requests whose caller is gone but whose cancel failed: cancelling again also frees the
        # slot if the item was dispatched meanwhile, so nobody holds a slot no caller will use.
        for item_id in sorted(self._abandoned):
            await self._cancel(item_id)

    async def renew(self, item_id: str, lease_ms: int) -> bool:
        renewed = await self.store.renew(item_id, lease_ms, now=self._clock())
        if renewed:
            known = self._tickets.get(item_id)
            expires = asyncio.get_running_loop().time() + lease_ms / 1000
            self._tickets[item_id] = _Ticket(
                known.workload if known else "", expires, known.tokens if known else 0
            )
        return renewed

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # Deliveries ----------------------------------------------------------------------------------

    def _deliver(self, deliveries: list[Delivery]) -> None:
        """The store's sink: outcomes of this replica's items, from any reply."""
        for delivery in deliveries:
            pending = self._queued.get(delivery.item_id)
            if pending is not None:
                pending.on_delivery(delivery)
                continue
            self._early[delivery.item_id] = delivery
            if len(self._early) > _EARLY_LIMIT:
                self._early.popitem(last=False)

    def _deliver_inbox(self, deliveries: list[Delivery]) -> None:
        """Wake-ups read from the inbox may predate a lapse of this replica's lease (it was
        paused with them in its socket): while the lease is in doubt they wait for a heartbeat."""
        if self._lease_in_doubt():
            self._deferred.extend(deliveries)
        else:
            self._deliver(deliveries)

    def defer_if_lease_in_doubt(self, pending: Pending, item_id: str, wait_ms: int) -> bool:
        """A dispatch read while this replica's lease may have lapsed can name a slot the pool
        has reclaimed since (the replica was paused with the reply unread: any reply, not only
        an inbox wake-up). Like a deferred wake-up it waits for a heartbeat: used if the pool
        still knows the replica, else released, and the request takes a new place."""
        if not self._lease_in_doubt():
            return False
        self._queued[item_id] = pending
        self._deferred.append(Delivery(item_id, ScriptStatus.DISPATCHED, wait_ms))
        return True

    def _lease_in_doubt(self) -> bool:
        if self._lease_lost:
            return True
        if self._last_beat is None:
            return False
        age = asyncio.get_running_loop().time() - self._last_beat
        return age > self.config.redis.lease_timeout

    # Heartbeat, lease and recovery ---------------------------------------------------------------

    async def heartbeat(self) -> None:
        started = asyncio.get_running_loop().time()
        owned = len(self._held) + len(self._queued)
        beat = await self.store.heartbeat(self.lease_ms, now=self._clock(), owned=owned)
        # The pool renewed the lease (or registered the replica afresh) as of `started`: what
        # follows (re-queued requests dispatched, deferred wake-ups applied) is not in doubt.
        self._last_beat = started
        self._lease_lost = False
        if not beat.known and self._registered:
            if beat.epoch != self._epoch:
                await self._recover_from_loss()  # a new pool: Redis lost the old one
            else:
                await self._reclaimed()  # the pool reclaimed this replica: its lease lapsed
        else:
            if self._deferred:
                deferred, self._deferred = self._deferred, []
                self._deliver(deferred)
            if beat.differs and self._registered:
                await self._reconcile()
        self._epoch = self.store.epoch
        self._registered = True
        self._prune_tickets()
        await self._retry_releases()

    async def _watch_lease(self) -> None:
        """Aborts what the replica holds once its lease may have lapsed (DESIGN.md §7)."""
        if not self._lease_lost and self._lease_in_doubt():
            self._lease_lost = True
            self.lapses += 1
            log.warning(
                "replica %s has not renewed its lease for %.1fs: aborting %d held requests",
                self.store.replica_id,
                self.config.redis.lease_timeout,
                len(self._held),
            )
            self._abort_held()

    def _abort_held(self) -> None:
        held, self._held = self._held, {}
        for item_id, hold in held.items():
            if hold.on_lost is not None:
                try:
                    hold.on_lost()
                except Exception:
                    log.exception("aborting the request holding %s failed", item_id)
            # Idempotent: frees the slot if the pool did not reclaim it already.
            self._spawn(self._release_quietly(item_id))

    async def _reclaimed(self) -> None:
        """The pool removed this replica (its lease ran out): what it held and queued is gone."""
        self.lapses += 1
        log.warning(
            "replica %s was reclaimed by the pool (lease lapsed): aborting %d held requests, "
            "re-queueing %d waiting ones",
            self.store.replica_id,
            len(self._held),
            len(self._queued),
        )
        self._abort_held()
        for delivery in self._deferred:
            if delivery.status is ScriptStatus.DISPATCHED:
                self._spawn(self._release_quietly(delivery.item_id))
        self._deferred = []
        await self._requeue_waiters()

    async def _reconcile(self) -> None:
        """The pool's record of this replica's items differs from what it holds (lost writes
        after a failover, a release that failed, or calls still on the wire): align it."""
        redis = self.config.redis
        grace_ms = round((redis.heartbeat_interval + 2 * redis.timeout) * 1000)
        held = [(item_id, hold.workload, hold.tokens) for item_id, hold in self._held.items()]
        # Releases wait for this call (see release): the list above must stay true until it ran.
        self._reconciling = asyncio.ensure_future(
            self.store.reconcile(held, list(self._queued), grace_ms, now=self._clock())
        )
        try:
            result = await asyncio.shield(self._reconciling)
        finally:
            # Retrieved here; the releases waiting on it only need it to be done.
            self._reconciling = None
        if result.released or result.readded or result.dropped or result.missing:
            log.warning(
                "replica %s reconciled with the pool: released %d, re-added %d, dropped %d, "
                "re-queueing %d lost requests",
                self.store.replica_id,
                result.released,
                result.readded,
                result.dropped,
                len(result.missing),
            )
        for item_id in result.missing:
            pending = self._queued.pop(item_id, None)
            if pending is not None and pending.requeueable:
                with contextlib.suppress(StoreError):
                    await asyncio.shield(pending.requeue())
            elif pending is not None:
                pending.lost_while_expiring()

    async def _recover_from_loss(self, _now: int | None = None) -> None:
        """The store hook for a pool without configuration, and the heartbeat's answer to a new
        epoch: one recovery at a time, shared by every call that needs it."""
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.ensure_future(self._recover())
        await asyncio.shield(self._recovery)

    async def _recover(self) -> None:
        """Redis lost the pool: count what this replica still holds, then re-queue its waiters.

        Nothing of this replica's is admitted before its slots and live tickets are back in the
        count; a fresh pool holds all dispatch for ``redis.recoveryHold`` so the other replicas
        can do the same (lua/configure.lua)."""
        self.recoveries += 1
        now = self._clock()
        tickets = self._live_tickets()
        log.warning(
            "pool state lost for replica %s: re-registering %d held slots and %d tickets, "
            "re-queueing %d waiters",
            self.store.replica_id,
            len(self._held),
            len(tickets),
            len(self._queued),
        )
        await self.store.configure(now, recovering=self._epoch is not None)
        holdings = [(item_id, h.workload, 0, h.tokens) for item_id, h in self._held.items()]
        holdings += tickets
        if holdings:
            await self.store.reregister(holdings, now=now, direct=True)
        await self.store.heartbeat(self.lease_ms, now=now, direct=True)
        self._epoch = self.store.epoch
        self._registered = True
        self._deferred = []
        await self._requeue_waiters()

    async def _requeue_waiters(self) -> None:
        """Waiting requests take new places, in the order they first arrived."""
        waiting = sorted(self._queued.values(), key=lambda p: p.order)
        self._queued.clear()
        for pending in waiting:
            if pending.requeueable:
                # A failure reaches the request's own result(); the others still go.
                with contextlib.suppress(StoreError):
                    await asyncio.shield(pending.requeue())
            else:
                pending.lost_while_expiring()

    def _live_tickets(self) -> list[tuple[str, str, int, int]]:
        now = asyncio.get_running_loop().time()
        return [
            (item_id, t.workload, int((t.expires - now) * 1000), t.tokens)
            for item_id, t in self._tickets.items()
            if t.expires - now > 0.001
        ]

    def _prune_tickets(self) -> None:
        now = asyncio.get_running_loop().time()
        for item_id in [i for i, t in self._tickets.items() if t.expires <= now]:
            del self._tickets[item_id]

    # Loops ---------------------------------------------------------------------------------------

    async def maintain(self, *, force: bool = False) -> None:
        interval_ms = round(self.config.redis.maintenance_interval * 1000)
        await self.store.maintain(interval_ms, force=force, now=self._clock())

    async def _inbox_loop(self) -> None:
        while not self._stopping:
            try:
                self._deliver_inbox(await self.store.pop_inbox(_INBOX_BLOCK_S))
            except Exception as exc:
                self._loop_failed("inbox", exc)
                await asyncio.sleep(_RETRY_BACKOFF_S)

    async def _every(
        self, interval_s: float, step: Callable[[], Coroutine[Any, Any, None]]
    ) -> None:
        name = getattr(step, "__name__", "loop")
        while not self._stopping:
            await asyncio.sleep(interval_s)
            try:
                await step()
            except Exception as exc:
                self._loop_failed(name, exc)

    def _loop_failed(self, name: str, exc: Exception) -> None:
        """A background loop never dies: it logs, counts and goes on (unless it is being
        stopped: a client library may turn the cancellation into an error of its own)."""
        task = asyncio.current_task()
        if self._stopping or (task is not None and task.cancelling()):
            raise asyncio.CancelledError from exc
        self.loop_errors += 1
        if isinstance(exc, StoreError):
            log.warning("%s: %s", name, exc)
        else:
            log.error("%s: unexpected %s", name, exc, exc_info=exc)
