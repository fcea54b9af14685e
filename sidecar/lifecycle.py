"""One request from enqueue to its outcome: the object that owns it (``Pending``).

Every way a request can end goes through here: its enqueue reply, a wake-up from any reply or the
inbox, its TTL firing on this replica, its caller going away, the store losing it. The store's
replies reach it through callbacks that run whatever happens to the awaiting caller, so a reply
is never lost to a cancellation, and whichever comes first decides. The outcome is reported once.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import msgspec

from sidecar.errors import StoreError
from sidecar.outcome import STATUS_OUTCOME, Outcome, ScriptStatus
from sidecar.request import FlowControlRequest

if TYPE_CHECKING:
    from sidecar.controller import FlowController
    from sidecar.store.pool import Delivery


class Admission(msgspec.Struct, frozen=True):
    """The outcome of one request. ``item_id`` names the slot to release when dispatched."""

    outcome: Outcome
    item_id: str = ""
    wait_ms: int = 0

    @property
    def admitted(self) -> bool:
        return self.outcome is Outcome.DISPATCHED


class Pending:
    """A submitted request. ``result`` waits for its outcome (once)."""

    # One per request on the hot path: slots make it smaller and its attributes faster to reach.
    __slots__ = (
        "_ctrl",
        "_done",
        "_expiring",
        "_gone",
        "_reported",
        "_requeued",
        "deadline",
        "item_id",
        "lease_ms",
        "order",
        "request",
        "sent_at",
        "workload",
    )

    def __init__(
        self,
        controller: FlowController,
        request: FlowControlRequest,
        lease_ms: int,
        deadline: float,
        order: int,
    ) -> None:
        self._ctrl = controller
        self.request = request
        self.lease_ms = lease_ms
        self.deadline = deadline  # event-loop time at which the request's TTL runs out
        self.order = order  # arrival order on this replica (recovery re-queues in this order)
        self.workload = controller.workload_key(request.workload_id)
        self.item_id = ""
        self._done: asyncio.Future[Admission] = asyncio.get_running_loop().create_future()
        self._gone = False  # the caller stopped waiting: undo whatever arrives later
        self._expiring = False
        self._requeued = False
        self._reported = False
        self.sent_at = 0.0  # event-loop time the (last) enqueue was sent

    @property
    def admission(self) -> Admission | None:
        """The outcome, once decided (right after submit for the fast path and rejections)."""
        if self._done.done() and not self._done.cancelled() and self._done.exception() is None:
            return self._done.result()
        return None

    @property
    def requeueable(self) -> bool:
        return not (self._done.done() or self._gone or self._expiring)

    # Replies (callbacks: they run whether or not anyone is awaiting) ----------------------------

    def on_enqueue_reply(self, call: asyncio.Future[Any]) -> None:
        if call.cancelled() or call.exception() is not None:
            exc = None if call.cancelled() else call.exception()
            if self._requeued and not self._gone and not self._done.done():
                # Re-queueing after a loss failed: the caller learns it from result().
                error = exc if isinstance(exc, StoreError) else StoreError(f"re-queue: {exc}")
                self._done.set_exception(error)
            return
        reply = call.result()
        self._time_enqueue(reply.status)
        if reply.status is ScriptStatus.DISPATCHED:
            self._dispatched(reply.item_id, int(reply.detail or 0))
        elif reply.status is ScriptStatus.QUEUED:
            self.item_id = reply.item_id
            if self._gone:
                self._ctrl.cancel_later(reply.item_id)
                return
            early = self._ctrl.track_queued(self)
            if early is not None:
                self.on_delivery(early)
        else:
            outcome = STATUS_OUTCOME.get(reply.status, Outcome.REJECTED_OTHER)
            self.settle(Admission(outcome, reply.item_id))

    def _time_enqueue(self, status: ScriptStatus) -> None:
        hook = self._ctrl.on_enqueued
        if hook is not None:
            outcome = None
            if status is not ScriptStatus.QUEUED:
                outcome = STATUS_OUTCOME.get(status, Outcome.REJECTED_OTHER)
            hook(self.request, outcome, asyncio.get_running_loop().time() - self.sent_at)

    def on_delivery(self, delivery: Delivery) -> None:
        """A wake-up for this request's queued item (dispatched, or evicted elsewhere)."""
        self._ctrl.untrack(self, delivery.item_id)
        if delivery.status is ScriptStatus.DISPATCHED:
            self._dispatched(delivery.item_id, delivery.wait_ms)
        elif delivery.status is not ScriptStatus.NOT_FOUND:
            outcome = STATUS_OUTCOME.get(delivery.status, Outcome.EVICTED_OTHER)
            self.settle(Admission(outcome, delivery.item_id, delivery.wait_ms))

    def _dispatched(self, item_id: str, wait_ms: int) -> None:
        self.item_id = item_id
        if self._gone or self._done.done():
            # Nobody will use this slot (the caller left, or the request already has an outcome).
            self._ctrl.release_later(item_id)
            return
        # A slot the replica holds (not a ticket's) that it learns of while its lease may have
        # lapsed may be one the pool has reclaimed since: it waits for a heartbeat.
        if self.lease_ms == 0 and self._ctrl.defer_if_lease_in_doubt(self, item_id, wait_ms):
            return
        self._ctrl.hold(item_id, self.workload, self.lease_ms, self.request.tokens)
        self.settle(Admission(Outcome.DISPATCHED, item_id, wait_ms))

    def lost_while_expiring(self) -> None:
        """The pool lost this request's item (the replica was reclaimed, or Redis its data)
        while its TTL ran out here, its dispatch waiting for a heartbeat: it takes no new
        place, since it outlived its TTL."""
        if self._expiring:
            self.settle(Admission(Outcome.EVICTED_TTL, self.item_id))

    def settle(self, admission: Admission) -> None:
        if not self._done.done():
            self._done.set_result(admission)

    # The caller's side -------------------------------------------------------------------------

    async def enqueued(self, call: asyncio.Future[Any]) -> None:
        """Waits for the enqueue reply (the request's place). Raises StoreError if it failed."""
        try:
            await asyncio.shield(call)
        except asyncio.CancelledError:
            self._abandon()
            raise

    def requeue(self) -> asyncio.Future[Any]:
        """After the store lost the queue: the same request takes a new place (recovery)."""
        self._requeued = True
        self.item_id = ""
        return self._ctrl.start_enqueue(self, direct=True)

    async def result(self) -> Admission:
        done = self._done
        if done.done():
            # Decided by the enqueue reply (the fast path, a rejection): nothing to wait for, so
            # no timer and no shield; with no await here, no cancellation can come between.
            admission = done.result()  # raises what a failed re-queue set
            self._report(admission)
            return admission
        try:
            try:
                async with asyncio.timeout_at(self.deadline):
                    admission = await asyncio.shield(self._done)
            except TimeoutError:
                admission = await self._expire()
        except asyncio.CancelledError:
            cleanup = self._abandon()
            if cleanup is not None:
                # The caller's cancellation completes once its queue place is gone, so whoever
                # cancelled it sees a consistent pool (the clean-up runs on if cancelled again).
                await asyncio.shield(cleanup)
            raise
        self._report(admission)
        return admission

    async def _expire(self) -> Admission:
        """The TTL ran out on this replica: take the item out, unless it was just dispatched."""
        self._expiring = True
        if self._done.done():
            return self._done.result()
        item_id = self.item_id
        if not item_id:
            # Still being (re-)enqueued: the reply, when it comes, is undone.
            self._gone = True
            return Admission(Outcome.EVICTED_TTL)
        reply = await self._ctrl.expire(item_id)
        self._ctrl.untrack(self, item_id)  # later wake-ups for this item are stale
        if self._done.done():
            return self._done.result()  # a wake-up arrived while the cancel was on the wire
        if reply.status is ScriptStatus.DISPATCHED:
            # Dispatched while the timer fired: the slot is ours, so the request may still go.
            self._dispatched(item_id, self._ctrl.elapsed_ms(self))
            if not self._done.done():
                # Read while this replica's lease is in doubt: the next heartbeat says whether
                # the slot is still ours (FlowController.defer_if_lease_in_doubt).
                return await asyncio.shield(self._done)
            return self._done.result()
        # Removed here, or already by another replica's maintenance (its wake-up is still on the
        # way): either way the request outlived its TTL.
        self.settle(Admission(Outcome.EVICTED_TTL, item_id))
        return self._done.result()

    def _abandon(self) -> asyncio.Task[None] | None:
        """The caller went away: the queued item goes, a slot it was given is freed. Returns the
        clean-up task, if one was started."""
        if self._gone:
            return None
        self._gone = True
        cleanup = None
        if self._done.done():
            if self._done.exception() is None and self._done.result().admitted:
                cleanup = self._ctrl.release_later(self._done.result().item_id)
        elif self.item_id:
            # Also while its TTL cancel is on the wire: that one keeps a slot it finds in flight.
            self._ctrl.untrack(self, self.item_id)
            cleanup = self._ctrl.cancel_later(self.item_id)
        # Else the enqueue is on the wire: on_enqueue_reply undoes it.
        cancelled = Admission(Outcome.EVICTED_CANCELLED, self.item_id, self._ctrl.elapsed_ms(self))
        self._report(cancelled)
        self.settle(cancelled)
        return cleanup

    def _report(self, admission: Admission) -> None:
        if not self._reported:
            self._reported = True
            self._ctrl.report(self.request, admission)
