"""Redis commands per admission, commands run inside scripts included (``INFO commandstats``).

Drives the public FlowController API on a private redis-server, with the pool's periodic loops
quiet, and prints two figures:

* fast path: capacity free, one request is enqueued (dispatched at once) and released;
* queued path: replica B holds the only slot, a request queues on replica A, B's release
  dispatches it (A wakes through its inbox), then A releases it. Counted: A's enqueue, B's
  release, A's inbox pop and A's release.

Each figure is the average over ``--repeats`` admissions; the script calls themselves (FCALL)
count as one command each, like every command they run.

    python -m bench.commands [--repeats N]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from bench.procs import RedisServer, workdir
from bench.redis_bench import command_calls, info, pool_config, request, wait_blocked
from sidecar.controller import FlowController
from sidecar.store import PoolStore
from sidecar.store.connect import connect
from sidecar.store.scripts import library

# Commands of the measuring client itself, and the inbox pops a listener re-arms.
NOT_COUNTED = frozenset({"info", "hello", "client", "script", "function", "echo"})
INBOX_POPS = frozenset({"blpop", "blmpop", "lpop"})
# The periodic loops must not run inside a counted window.
QUIET = {"heartbeatInterval": "1h", "leaseTimeout": "2h", "maintenanceInterval": "1h"}


class MeasureError(RuntimeError):
    """The pool did not behave as the measurement assumes; its figures would be meaningless."""


@dataclass
class PathCount:
    admissions: int
    delta: Counter[str]

    @property
    def per_admission(self) -> float:
        return sum(n for cmd, n in self.delta.items() if cmd not in NOT_COUNTED) / self.admissions

    def breakdown(self) -> str:
        counted = {c: n for c, n in self.delta.items() if c not in NOT_COUNTED}
        return ", ".join(f"{c} {n / self.admissions:g}" for c, n in sorted(counted.items()))


async def calls(probe: Any) -> Counter[str]:
    return command_calls(await info(probe, "commandstats"))


async def fast_path(url: str, probe: Any, repeats: int) -> PathCount:
    client, inbox = connect(url, timeout_s=5.0)
    ctrl = FlowController(PoolStore(client, pool_config("cmd-fast", 4, **QUIET), "replica-a"))
    try:
        await ctrl.start(loops=False)
        # A first round registers the workloads, so the counted one sees known workloads only.
        for counted in (False, True):
            before = await calls(probe)
            for n in range(repeats):
                admission = await ctrl.enqueue_and_wait(request(n))
                if not admission.admitted or not await ctrl.release(admission.item_id):
                    raise MeasureError(f"fast path: not admitted and released: {admission}")
            if counted:
                return PathCount(repeats, (await calls(probe)) - before)
        raise AssertionError("unreachable")
    finally:
        await ctrl.stop()
        await client.aclose()
        await inbox.aclose()


async def queued_path(url: str, probe: Any, repeats: int) -> PathCount:
    conns = [connect(url, timeout_s=5.0) for _ in range(2)]
    cfg = pool_config("cmd-queued", 1, **QUIET)
    a, b = (
        FlowController(PoolStore(c, cfg, rid, inbox_client=i))
        for (c, i), rid in zip(conns, ("replica-a", "replica-b"), strict=True)
    )
    try:
        await a.start(loops=False)
        await b.start(loops=False)
        a.start_loops()
        await wait_blocked(probe, 1)
        total: Counter[str] = Counter()
        for n in range(repeats):
            held = await b.enqueue_and_wait(request(2 * n))
            if not held.admitted:
                raise MeasureError("queued path: replica B could not take the free slot")
            await wait_blocked(probe, 1)
            before = await calls(probe)
            pending = await a.submit(request(2 * n + 1))
            if pending.admission is not None:
                raise MeasureError("queued path: the request was not queued behind B's slot")
            await b.release(held.item_id)
            admitted = await pending.result()
            if not admitted.admitted or not await a.release(admitted.item_id):
                raise MeasureError(f"queued path: not dispatched and released: {admitted}")
            # The pop that woke A completed inside the window; the one re-armed after it is the
            # wait for whatever comes next and completes only in the next window, if at all.
            await wait_blocked(probe, 1)
            total += (await calls(probe)) - before
        return PathCount(repeats, total)
    finally:
        await a.stop()
        await b.stop()
        for client, inbox in conns:
            await client.aclose()
            await inbox.aclose()


async def measure(repeats: int) -> tuple[PathCount, PathCount]:
    server = RedisServer(workdir())
    await server.start()
    probe: Any = Redis.from_url(server.url)
    try:
        # Loaded up front: a "function not found" retry would count as a command.
        await probe.function_load(library()[1], replace=True)
        return await fast_path(server.url, probe, repeats), await queued_path(
            server.url, probe, repeats
        )
    finally:
        await probe.aclose()
        server.kill()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.commands", description=__doc__)
    parser.add_argument("--repeats", type=int, default=20, help="admissions per path")
    args = parser.parse_args(argv)
    fast, queued = asyncio.run(measure(args.repeats))
    print(f"fast path:   {fast.per_admission:.1f} commands per admission ({fast.breakdown()})")
    print(f"queued path: {queued.per_admission:.1f} commands per admission ({queued.breakdown()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
