"""Controller edge cases: cancellation at every point, deferred releases, config conflicts."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.controller import FlowController
from sidecar.errors import ConfigConflictError, StoreError
from sidecar.outcome import Outcome, ScriptStatus
from sidecar.request import FlowControlRequest
from sidecar.store import ScriptReply
from tests.conftest import Backend, make_config


async def stats(ctrl: FlowController) -> dict[bytes, bytes]:
    result: dict[bytes, bytes] = await ctrl.store.client.hgetall(ctrl.store.key("pool"))
    return result


async def test_cancel_during_enqueue_call_undoes_a_fast_path_dispatch(backend: Backend) -> None:
    ctrl = FlowController(backend.store(make_config(limit=1)))
    await ctrl.start(loops=False)
    task = asyncio.create_task(ctrl.enqueue_and_wait(FlowControlRequest(request_id="r")))
    await asyncio.sleep(0)  # let it send the enqueue, then cancel while the reply is on its way
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await ctrl.stop()  # waits for the clean-up it started
    assert int((await stats(ctrl))[b"inflight"]) == 0


async def test_cancel_while_queued_is_evicted_cancelled(backend: Backend) -> None:
    ctrl = FlowController(backend.store(make_config(limit=1)))
    await ctrl.start(loops=False)
    holder = await ctrl.enqueue_and_wait(FlowControlRequest(request_id="h"))
    pending = await ctrl.submit(FlowControlRequest(request_id="q"))
    waiting = asyncio.create_task(pending.result())
    assert int((await stats(ctrl))[b"qn"]) == 1
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert int((await stats(ctrl))[b"qn"]) == 0
    await ctrl.release(holder.item_id)
    assert int((await stats(ctrl))[b"inflight"]) == 0  # the cancelled one never got the slot


async def test_ttl_expiry_is_evicted_ttl(backend: Backend) -> None:
    ctrl = FlowController(backend.store(make_config(limit=1)))
    await ctrl.start(loops=False)
    await ctrl.enqueue_and_wait(FlowControlRequest(request_id="h"))
    admission = await ctrl.enqueue_and_wait(FlowControlRequest(request_id="q", ttl_ms=30))
    assert admission.outcome is Outcome.EVICTED_TTL
    assert int((await stats(ctrl))[b"qn"]) == 0


async def test_failed_release_is_retried_on_heartbeat(backend: Backend) -> None:
    ctrl = FlowController(backend.store(make_config(limit=1)))
    await ctrl.start(loops=False)
    admission = await ctrl.enqueue_and_wait(FlowControlRequest(request_id="h"))
    real = ctrl.store.submit_release
    calls = 0

    def failing(
        item_id: str, now: int | None = None, *, held: tuple[str, int] | None = None
    ) -> asyncio.Future[ScriptReply]:
        nonlocal calls
        calls += 1
        if calls == 1:
            refused: asyncio.Future[ScriptReply] = asyncio.get_running_loop().create_future()
            refused.set_exception(StoreError("release: connection refused"))
            return refused
        return real(item_id, now=now, held=held)

    ctrl.store.submit_release = failing  # type: ignore[method-assign]
    with pytest.raises(StoreError):
        await ctrl.release(admission.item_id)
    assert int((await stats(ctrl))[b"inflight"]) == 1
    await ctrl.heartbeat()
    assert int((await stats(ctrl))[b"inflight"]) == 0


async def test_changing_a_busy_bands_policy_is_refused(backend: Backend) -> None:
    first = FlowController(backend.store(make_config(limit=1)))
    await first.start(loops=False)
    await first.enqueue_and_wait(FlowControlRequest(request_id="h"))
    await first.submit(FlowControlRequest(request_id="q"))  # band 0 now has a queued request
    fcfs = make_config(
        limit=1,
        flowControl={"defaultPriorityBand": {"orderingPolicy": {"type": "fcfs-ordering-policy"}}},
    )
    second = FlowController(backend.store(fcfs, "r2"))
    with pytest.raises(ConfigConflictError, match="band 0"):
        await second.start(loops=False)
    # Same policies with other limits are fine.
    third = FlowController(backend.store(make_config(limit=5), "r3"))
    await third.start(loops=False)
    assert await third.store.client.hget(third.store.key("pool"), "limit") == b"5"


async def test_failed_cancel_is_retried_and_frees_a_raced_slot(backend: Backend) -> None:
    ctrl = FlowController(backend.store(make_config(limit=1)))
    await ctrl.start(loops=False)
    holder = await ctrl.enqueue_and_wait(FlowControlRequest(request_id="h"))
    pending = await ctrl.submit(FlowControlRequest(request_id="q"))
    waiting = asyncio.create_task(pending.result())
    real = ctrl.store.cancel

    async def failing(item_id: str, reason: ScriptStatus, now: int | None = None) -> ScriptReply:
        raise StoreError("cancel: connection refused")

    ctrl.store.cancel = failing  # type: ignore[method-assign]
    await asyncio.sleep(0)  # the waiting task starts waiting
    waiting.cancel()  # the client goes away, and its cancel cannot reach Redis
    with pytest.raises(asyncio.CancelledError):
        await waiting
    # Meanwhile the abandoned request is dispatched into the freed slot...
    await ctrl.release(holder.item_id)
    assert int((await stats(ctrl))[b"inflight"]) == 1
    ctrl.store.cancel = real  # type: ignore[method-assign]
    await ctrl.heartbeat()  # ...and the retried cancel gives the slot back
    assert int((await stats(ctrl))[b"inflight"]) == 0
