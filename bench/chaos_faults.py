"""The chaos run's faults: SIGKILL + restart a replica, SIGSTOP/SIGCONT one, restart Redis empty.

Faults run one after another on a schedule spread over the load, so each one's recovery is
measured alone. Every fault is recorded with the monotonic times it began and ended.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from bench.chaos_load import Generations
from bench.procs import RedisServer, Replica
from sidecar.contract import POOL, REPLICAS
from sidecar.keys import pool_prefix
from tests.pool_keys import inflight_by_owner

# A pause lasts this much longer than leaseTimeout, so the paused replica's lease surely lapses
# and the others reclaim its slots (maintenance runs every maintenanceInterval).
PAUSE_BEYOND_LEASE_S = 1.5


@dataclass
class Fault:
    kind: str  # kill | pause | redis
    replica: int  # -1 for redis
    due: float  # seconds after the load started
    at: float = -1.0  # monotonic: the signal / the kill of Redis
    end: float = -1.0  # monotonic: the replica (or Redis) is back, or SIGCONT was sent
    held: int = -1  # pause: in-flight slots the replica held in Redis right after SIGSTOP

    @property
    def label(self) -> str:
        return "redis restart" if self.kind == "redis" else f"{self.kind} r{self.replica}"


def schedule(
    kills: int, pauses: int, restarts: int, replicas: int, span: tuple[float, float], seed: int
) -> list[Fault]:
    """Faults evenly spaced over ``span`` (seconds after the load started), kinds interleaved."""
    rng = random.Random(seed)
    kinds = ["kill"] * kills + ["pause"] * pauses + ["redis"] * restarts
    rng.shuffle(kinds)
    start, stop = span
    step = (stop - start) / max(len(kinds), 1)
    return [
        Fault(kind, -1 if kind == "redis" else rng.randrange(replicas), start + i * step)
        for i, kind in enumerate(kinds)
    ]


class FaultRunner:
    def __init__(
        self,
        redis: RedisServer,
        replicas: Sequence[Replica],
        gens: Generations,
        lease_s: float,
        pool: str,
    ) -> None:
        self.redis, self.replicas, self.gens = redis, replicas, gens
        self.lease_s = lease_s
        self.prefix = pool_prefix(pool)

    async def run(self, faults: Sequence[Fault], load_start: float) -> None:
        for fault in faults:
            delay = load_start + fault.due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.apply(fault)

    async def apply(self, fault: Fault) -> None:
        if fault.kind == "redis":
            fault.at = time.monotonic()
            await self.redis.restart_empty()
            fault.end = time.monotonic()
            return
        replica = self.replicas[fault.replica]
        if fault.kind == "kill":
            self.gens.killed(fault.replica)
            fault.at = time.monotonic()
            replica.kill()
            await replica.start()
            fault.end = time.monotonic()
            return
        self.gens.paused(fault.replica)
        replica.signal(signal.SIGSTOP)
        fault.at = time.monotonic()
        fault.held = await self.held_slots(replica)
        await asyncio.sleep(self.lease_s + PAUSE_BEYOND_LEASE_S - (time.monotonic() - fault.at))
        replica.signal(signal.SIGCONT)
        fault.end = time.monotonic()

    async def held_slots(self, replica: Replica) -> int:
        """In-flight slots owned by ``replica`` (under any of its incarnations' ids)."""
        client = Redis.from_url(self.redis.url, socket_timeout=2.0)
        try:
            owners = await inflight_by_owner(client, self.prefix)
        finally:
            await client.aclose()
        mine = replica.name + "-"
        return sum(n for owner, n in owners.items() if owner.startswith(mine))


async def pool_counts(url: str, pool: str) -> tuple[int, int]:
    """(in flight, queued) from the pool hash; a missing hash reads as zeros."""
    client = Redis.from_url(url, socket_timeout=2.0)
    try:
        inflight, queued = await client.hmget(pool_prefix(pool) + POOL, ["inflight", "qn"])
    finally:
        await client.aclose()
    return int(inflight or 0), int(queued or 0)


async def leftovers(url: str, pool: str) -> str:
    """What the pool still holds: in-flight records by owner, queued count, registered replicas."""
    prefix = pool_prefix(pool)
    client = Redis.from_url(url, socket_timeout=2.0, decode_responses=True)
    try:
        owners = await inflight_by_owner(client, prefix)
        stats = await client.hgetall(prefix + POOL)
        replicas = await client.zrange(prefix + REPLICAS, 0, -1)
    finally:
        await client.aclose()
    held = ", ".join(f"{o}: {n}" for o, n in sorted(owners.items())) or "none"
    return (
        f"stats inflight={stats.get('inflight', 0)} queued={stats.get('qn', 0)}; in-flight records "
        f"by owner: {held}; registered replicas: {', '.join(map(str, replicas)) or 'none'}"
    )
