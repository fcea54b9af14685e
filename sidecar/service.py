"""The admission service behind every HTTP surface: failure mode, draining, held requests.

Proxy, admission API and gateway check all ask ``admit``; it answers with an Admission, a ready-made
refusal (shutting down, Redis unavailable and failing closed) or PASS_THROUGH (Redis unavailable and
failing open: forward without a slot, counted).
"""

from __future__ import annotations

import asyncio
import enum
import logging

import msgspec

from sidecar.breaker import BreakerOpen, CircuitBreaker
from sidecar.config import Config, FailureMode
from sidecar.controller import Admission, FlowController
from sidecar.errors import StoreError
from sidecar.metrics import Metrics
from sidecar.request import FlowControlRequest

log = logging.getLogger(__name__)


class PassThrough(enum.Enum):
    """Forward without admission: Redis is unavailable and the failure mode is open."""

    PASS = "pass"


PASS_THROUGH = PassThrough.PASS

# Refusals decided without the queue (the queue's own are Admission outcomes).
SHUTTING_DOWN = "shutting_down"
STORE_UNAVAILABLE = "store_unavailable"


class Refused(msgspec.Struct, frozen=True):
    """Not admitted, and not by the queue: the sidecar is draining, or the store is unavailable
    and the failure mode is closed. sidecar/http/outcomes.py turns it into a response."""

    reason: str
    message: str


# What every HTTP surface gets from admit(); sidecar/http/outcomes.py `refused` maps the refusals.
Decision = Admission | Refused | PassThrough


class AdmissionService:
    def __init__(
        self,
        config: Config,
        controller: FlowController,
        metrics: Metrics,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.config = config
        self.controller = controller
        self.metrics = metrics
        # The breaker judges store calls, so it lives in the store; the service only reads it.
        store = controller.store
        if store.breaker is None:
            store.breaker = breaker or CircuitBreaker()
        self.breaker = store.breaker
        self.breaker.on_change = self._show_breaker
        self.draining = False
        # Admitted requests still running (proxy mode), for the graceful drain.
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def admit(self, request: FlowControlRequest, *, lease_ms: int = 0) -> Decision:
        if self.draining:
            return Refused(SHUTTING_DOWN, "the sidecar is shutting down")
        try:
            admission = await self.controller.enqueue_and_wait(request, lease_ms=lease_ms)
        except BreakerOpen:
            return self._without_store("circuit_open")
        except StoreError as exc:
            log.warning("admission store error: %s", exc)
            return self._without_store("store_error")
        return admission

    def _show_breaker(self, is_open: bool) -> None:
        # Called by the breaker when it opens or closes, whichever call (a request's or a
        # background loop's) made it change.
        self.metrics.breaker_open.set(1 if is_open else 0)

    def _without_store(self, reason: str) -> Refused | PassThrough:
        mode = self.config.redis.failure_mode
        self.metrics.failure_mode.labels(mode.value, reason).inc()
        if mode is FailureMode.OPEN:
            return PASS_THROUGH
        return Refused(STORE_UNAVAILABLE, "admission store unavailable (failureMode: closed)")

    async def release(self, item_id: str) -> bool:
        """Frees a slot; False if it was free already or the store failed (then the controller
        keeps the id and retries on its next heartbeat)."""
        return await self.release_ticket(item_id) is TicketResult.DONE

    def holding(self, admission: Admission | None) -> Holding:
        """Counts a running request for the drain and frees its slot however it ends.

        If the replica loses the slot (its lease lapsed while it was paused or cut off), the
        request is cancelled: it must not keep running on a slot the pool gave to another.
        ``enter_held`` then ``exit_held`` in a ``finally`` do the same without the context
        manager (the proxy's hot path)."""
        return Holding(self, admission)

    def enter_held(self, admission: Admission | None) -> None:
        self.active += 1
        self._idle.clear()
        if admission is not None:
            task = asyncio.current_task()
            if task is not None:
                self.controller.watch(admission.item_id, task.cancel)

    async def exit_held(self, admission: Admission | None) -> None:
        try:
            if admission is not None:
                # Runs to the end in the store even if this handler is cancelled meanwhile (its
                # reply may dispatch other requests); a failure is retried later. As release(),
                # without its two layers of coroutines.
                try:
                    await self.controller.release(admission.item_id)
                except StoreError as exc:
                    log.warning("release of %s deferred: %s", admission.item_id, exc)
        finally:
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    async def drain(self, grace_s: float) -> bool:
        """Stops admitting, then waits up to ``grace_s`` for running requests. True if all ended."""
        self.draining = True
        try:
            async with asyncio.timeout(grace_s):
                await self._idle.wait()
        except TimeoutError:
            log.warning("grace period over with %d requests still running", self.active)
            return False
        return True

    # Tickets (slots held outside the sidecar) -------------------------------------------------

    async def release_ticket(self, item_id: str) -> TicketResult:
        """Frees a ticket's slot. UNAVAILABLE when the store failed or the breaker is open:
        nothing was decided, and the controller retries the release on its heartbeats."""
        try:
            released = await self.controller.release(item_id)
        except StoreError as exc:
            log.warning("release of %s deferred: %s", item_id, exc)
            return TicketResult.UNAVAILABLE
        return TicketResult.DONE if released else TicketResult.NOT_HELD

    async def renew_ticket(self, item_id: str, lease_ms: int) -> TicketResult:
        """Extends a ticket's lease to ``lease_ms`` from now. NOT_HELD: it was released or its
        lease ran out. UNAVAILABLE: the store failed or the breaker is open (the client retries)."""
        try:
            renewed = await self.controller.renew(item_id, lease_ms)
        except StoreError as exc:
            log.warning("renew of %s failed: %s", item_id, exc)
            return TicketResult.UNAVAILABLE
        return TicketResult.DONE if renewed else TicketResult.NOT_HELD


class Holding:
    """``AdmissionService.holding``: ``enter_held`` and ``exit_held`` as a context manager (a
    class: a generator-based one costs more). The proxy calls the two directly."""

    __slots__ = ("_admission", "_service")

    def __init__(self, service: AdmissionService, admission: Admission | None) -> None:
        self._service = service
        self._admission = admission

    async def __aenter__(self) -> None:
        self._service.enter_held(self._admission)

    async def __aexit__(self, *_exc: object) -> None:
        # Never swallows the body's exception (returns None), as the generator form did not.
        await self._service.exit_held(self._admission)


class TicketResult(enum.Enum):
    """What a release or renew of a ticket did; sidecar/http/api.py maps it to a status."""

    DONE = "done"  # released, or renewed
    NOT_HELD = "not_held"  # already free: released before, or its lease ran out
    UNAVAILABLE = "unavailable"  # the store could not be asked: nothing was decided
