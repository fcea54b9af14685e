"""The reference's three behaviours, reproduced at engine level with a saturated pool.

Each scenario runs a FlowController on a virtual clock (absolute ms handed to every script), so
waits and rates are exact. The normalisation caps are set to each scenario's scale, as stated.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from sidecar.controller import Admission, FlowController, Pending
from sidecar.request import FlowControlRequest
from sidecar.workload import WorkloadContext
from tests.conftest import Backend, make_config


@dataclass
class Harness:
    """One replica, one slot, time moved by hand; records the dispatch order."""

    ctrl: FlowController
    now: list[int] = field(default_factory=lambda: [0])
    order: list[str] = field(default_factory=list)
    running: dict[str, asyncio.Task[Admission]] = field(default_factory=dict)
    holder: str = ""

    async def submit(self, name: str, workload: str, criticality: int) -> Pending:
        req = FlowControlRequest(
            request_id=name, workload=WorkloadContext(workload, criticality), ttl_ms=3_600_000
        )
        pending = await self.ctrl.submit(req)
        self.running[name] = asyncio.create_task(pending.result())
        return pending

    async def occupy(self) -> None:
        await self.submit("holder", "holder", 3)
        self.holder = (await self.running.pop("holder")).item_id

    async def release_next(self) -> str:
        """Frees the slot; returns the name of the request dispatched into it."""
        await self.ctrl.release(self.holder)
        done, _ = await asyncio.wait(self.running.values(), return_when=asyncio.FIRST_COMPLETED)
        (task,) = done
        name = next(n for n, t in self.running.items() if t is task)
        del self.running[name]
        self.holder = task.result().item_id
        self.order.append(name)
        return name


async def harness(backend: Backend, max_wait_s: float, max_rate: float) -> Harness:
    cfg = make_config(
        limit=1,
        flowControl={
            "maxRequestTTL": "1h",
            "defaultPriorityBand": {
                "orderingPolicy": {
                    "type": "workload-aware-ordering-policy",
                    "parameters": {"maxWaitTimeSeconds": max_wait_s, "maxRequestRate": max_rate},
                }
            },
        },
    )
    h = Harness(FlowController(backend.store(cfg)))
    h.ctrl._clock = lambda: h.now[0]
    await h.ctrl.start(loops=False)
    await h.occupy()
    return h


async def test_late_criticality_5_goes_before_3_and_1(backend: Backend) -> None:
    # Scale: 5 requests per workload in a 60 s window (~0.08 req/s) -> maxRequestRate 1 req/s;
    # waits of a few seconds -> maxWaitTimeSeconds 10.
    h = await harness(backend, max_wait_s=10, max_rate=1)
    for crit, workload in [(1, "batch"), (3, "normal"), (5, "critical")]:  # critical arrives last
        for i in range(5):
            h.now[0] += 100
            await h.submit(f"{workload}-{i}", workload, crit)
    for _ in range(15):
        h.now[0] += 500
        await h.release_next()
    assert [n.split("-")[0] for n in h.order] == ["critical"] * 5 + ["normal"] * 5 + ["batch"] * 5
    await h.ctrl.stop()


async def test_steady_low_rate_workload_overtakes_a_burst(backend: Backend) -> None:
    # Scale: a burst of 40 in a 60 s window is 0.67 req/s, the steady workload (one request every
    # 2.5 s) reaches 0.13 req/s -> maxRequestRate 0.5 req/s; the run lasts 20 s and burst items
    # wait up to 20 s -> maxWaitTimeSeconds 60.
    h = await harness(backend, max_wait_s=60, max_rate=0.5)
    for i in range(40):
        await h.submit(f"burst-{i}", "burst", 3)
    steady_waits = []
    for tick in range(1, 41):
        h.now[0] = tick * 500
        if tick % 5 == 0:
            await h.submit(f"steady-{tick}", "steady", 3)
        name = await h.release_next()
        if name.startswith("steady"):
            steady_waits.append(tick - int(name.split("-")[1]))
    # Every steady request went at the first release after it arrived, ahead of older burst items.
    assert steady_waits == [0] * 8
    burst_seen = [n for n in h.order if n.startswith("burst")]
    assert burst_seen == [f"burst-{i}" for i in range(32)]  # FIFO inside the lane
    await h.ctrl.stop()


async def test_high_average_wait_overtakes_higher_criticality(backend: Backend) -> None:
    # Scale: "hist" builds an average wait of ~30 s -> maxWaitTimeSeconds 30; a handful of
    # requests per minute -> maxRequestRate 10 req/s (the rate term stays negligible).
    h = await harness(backend, max_wait_s=30, max_rate=10)
    for i in range(3):
        await h.submit(f"hist-old{i}", "hist", 3)
    h.now[0] = 30_000
    for _ in range(3):
        await h.release_next()  # each waited 30 s: hist's average wait is now 30 s
    h.now[0] = 31_000
    for i in range(3):
        await h.submit(f"fresh-{i}", "fresh", 4)  # higher criticality, no history
    for i in range(3):
        await h.submit(f"hist-{i}", "hist", 3)
    h.order.clear()
    for _ in range(6):
        h.now[0] += 100
        await h.release_next()
    assert h.order == [f"hist-{i}" for i in range(3)] + [f"fresh-{i}" for i in range(3)]
    await h.ctrl.stop()
