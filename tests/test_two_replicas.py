"""Two replicas on one store: one global limit, exactly one outcome per request, nothing leaks."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from sidecar.controller import FlowController
from sidecar.outcome import Outcome
from sidecar.request import FlowControlRequest
from sidecar.workload import WorkloadContext
from tests.conftest import Backend, make_config
from tests.pool_keys import inflight_records, queued_records

LIMIT = 4
REQUESTS = 400


async def test_global_limit_holds_across_replicas(backend: Backend) -> None:
    cfg = make_config(limit=LIMIT, flowControl={"maxRequests": 150})
    replicas = [FlowController(backend.store(cfg, f"replica-{i}")) for i in range(2)]
    for r in replicas:
        await r.start()
    rng = random.Random(7)
    in_flight = 0
    peak = 0
    outcomes: Counter[str] = Counter()

    async def one(n: int) -> None:
        nonlocal in_flight, peak
        ctrl = replicas[n % 2]
        request = FlowControlRequest(
            request_id=str(n),
            fairness_id=f"flow-{n % 3}",
            priority=rng.choice([0, 0, 1]),
            workload=WorkloadContext(f"w{n % 7}", 1 + n % 5),
            ttl_ms=rng.choice([50, 20_000, 20_000]),
        )
        admission = await ctrl.enqueue_and_wait(request)
        outcomes[admission.outcome] += 1
        if not admission.admitted:
            return
        in_flight += 1
        peak = max(peak, in_flight)
        stored = int(await ctrl.store.client.hget(ctrl.store.key("pool"), "inflight"))
        assert stored <= LIMIT
        await asyncio.sleep(rng.random() * 0.004)  # the upstream doing its work
        in_flight -= 1
        await ctrl.release(admission.item_id)

    tasks = [asyncio.create_task(one(n)) for n in range(REQUESTS)]
    # Some clients go away while queued or in flight.
    await asyncio.sleep(0.05)
    cancelled = [t for t in tasks[300:] if not t.done()][:20]
    for t in cancelled:
        t.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [
        r
        for r in results
        if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)
    ]
    assert errors == []
    n_cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
    assert sum(outcomes.values()) + n_cancelled == REQUESTS  # exactly one outcome each
    assert 1 <= peak <= LIMIT
    assert outcomes[Outcome.DISPATCHED] >= REQUESTS // 10  # how many depends on timing
    # Short-TTL requests expire and a full queue rejects; nothing else happens to a request.
    assert set(outcomes) <= {Outcome.DISPATCHED, Outcome.EVICTED_TTL, Outcome.REJECTED_CAPACITY}
    for r in replicas:
        await r.stop()
    store = replicas[0].store
    # Cancelled clients' clean-ups have finished (stop awaits them): nothing leaks.
    stats = await store.client.hgetall(store.key("pool"))
    assert int(stats[b"inflight"]) == 0
    assert int(stats.get(b"qn", 0)) == 0
    assert await inflight_records(store.client, store.prefix) == {}
    assert await queued_records(store.client, store.prefix) == {}
