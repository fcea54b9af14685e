"""The admission service behind every HTTP surface: failure mode, circuit breaker, draining.

Proxy, admission API and gateway check all ask ``admit``; it answers with an Admission, a ready-made
refusal (shutting down, Redis unavailable and failing closed) or PASS_THROUGH (Redis unavailable and
failing open: forward without a slot, counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from sidecar.breaker import CircuitBreaker
from sidecar.config import Config, FailureMode
from sidecar.controller import Admission, FlowController
from sidecar.errors import StoreError
from sidecar.http.outcomes import SHUTTING_DOWN, STORE_UNAVAILABLE, unavailable
from sidecar.metrics import Metrics
from sidecar.request import FlowControlRequest

log = logging.getLogger(__name__)


class PassThrough(enum.Enum):
    """Forward without admission: Redis is unavailable and the failure mode is open."""

    PASS = "pass"


PASS_THROUGH = PassThrough.PASS
Decision = Admission | web.Response | PassThrough


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
        self.breaker = breaker or CircuitBreaker()
        self.draining = False
        # Admitted requests still running (proxy mode), for the graceful drain.
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def admit(self, request: FlowControlRequest, *, lease_ms: int = 0) -> Decision:
        if self.draining:
            return unavailable(SHUTTING_DOWN, "the sidecar is shutting down")
        if not self.breaker.allow():
            return self._without_store("circuit_open")
        try:
            admission = await self.controller.enqueue_and_wait(request, lease_ms=lease_ms)
        except StoreError as exc:
            log.warning("admission store error: %s", exc)
            self._store_failed()
            return self._without_store("store_error")
        self.breaker.success()
        self.metrics.breaker_open.set(0)
        return admission

    def _store_failed(self) -> None:
        self.breaker.failure()
        self.metrics.breaker_open.set(1 if self.breaker.is_open else 0)

    def _without_store(self, reason: str) -> web.Response | PassThrough:
        mode = self.config.redis.failure_mode
        self.metrics.failure_mode.labels(mode.value, reason).inc()
        if mode is FailureMode.OPEN:
            return PASS_THROUGH
        return unavailable(STORE_UNAVAILABLE, "admission store unavailable (failureMode: closed)")

    async def release(self, item_id: str) -> bool:
        try:
            return await self.controller.release(item_id)
        except StoreError as exc:
            # The controller keeps the id and retries on its next heartbeat.
            log.warning("release of %s deferred: %s", item_id, exc)
            self._store_failed()
            return False

    @contextlib.asynccontextmanager
    async def holding(self, admission: Admission | None) -> AsyncIterator[None]:
        """Counts a running request for the drain and frees its slot however it ends."""
        self.active += 1
        self._idle.clear()
        try:
            yield
        finally:
            try:
                if admission is not None:
                    # Not shielded (a Task per request costs): if the client's disconnect cancels
                    # this release, the controller retries it on its next heartbeat.
                    await self.release(admission.item_id)
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
