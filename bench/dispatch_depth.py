"""Dispatch rate with a deep queue against a shallow one, as a ratio from one run.

A step releases the one held slot (release.lua dispatches the best queued item, which becomes
the held slot) and enqueues one new request, so the queue keeps its depth. Each depth is its own
pool on the same Redis; rounds alternate between depths so machine noise hits all of them. The
best round per depth is reported, and rate(deepest) / rate(shallowest) is checked against 0.8.

    python -m bench.dispatch_depth [--depths 100,100000] [--steps 3000] [--rounds 3]
                                   [--redis-url URL]

Without ``--redis-url`` a private redis-server is started on a free port and stopped at the end.
With it, the pools' keys (``as:{bench-d<depth>}:*``) are deleted before and after the run. The
exit status is 1 when the ratio misses the target.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis

from sidecar.config import Config, load_config
from sidecar.keys import pool_prefix
from sidecar.outcome import ScriptStatus
from sidecar.store import PoolStore, ScriptReply
from tests.redis_proc import RedisProcess

TARGET_RATIO = 0.8
REPLICA = "bench"
TTL_MS = 3_600_000  # nothing may expire while a run lasts
FILL_CHUNK = 500  # enqueues in flight at once while filling
# Connections for the fill; Redis runs one script at a time, so more would only add sockets.
FILL_CONNECTIONS = 32
WORKLOADS, CRITICALITIES, FLOWS = 50, 5, 2


def request_shape(n: int) -> tuple[str, int, str]:
    """The n-th request's (workload, criticality, flow). Workload varies fastest, so even a
    shallow queue touches every workload, and every 500 requests cover each combination once."""
    workload = n % WORKLOADS
    criticality = 1 + (n // WORKLOADS) % CRITICALITIES
    flow = (n // (WORKLOADS * CRITICALITIES)) % FLOWS
    return f"w{workload}", criticality, f"f{flow}"


def bench_config(depth: int) -> Config:
    return load_config(
        {
            "pool": f"bench-d{depth}",
            "saturationDetector": {"parameters": {"maxConcurrency": 1}},
            "flowControl": {
                "maxRequests": 0,  # unlimited: the fill must never be rejected
                "maxRequestTTL": "1h",
                "defaultRequestTTL": "1h",
            },
            "workloadRegistry": {"maxTracked": 10 * WORKLOADS},
        }
    )


class BenchError(RuntimeError):
    """The scripts did something a correct pool never does; the timing would be meaningless."""


@dataclass
class DepthPool:
    """One depth's pool: its store, the slot it holds, and how many requests it has made."""

    depth: int
    store: PoolStore
    held: str = ""
    made: int = 0
    fill_s: float = 0.0
    rates: list[float] = field(default_factory=list)
    server_us: list[float] = field(default_factory=list)

    async def enqueue(self) -> ScriptReply:
        workload, criticality, flow = request_shape(self.made)
        self.made += 1
        return await self.store.enqueue(
            band=0,
            flow=flow,
            workload=workload,
            criticality=criticality,
            byte_size=100,
            ttl_ms=TTL_MS,
        )

    async def fill(self) -> None:
        start = time.perf_counter()
        await self.store.configure()
        first = await self.enqueue()
        if first.status is not ScriptStatus.DISPATCHED:
            raise BenchError(f"d{self.depth}: the first request was not dispatched: {first}")
        self.held = first.item_id
        left = self.depth
        while left:
            chunk = min(left, FILL_CHUNK)
            replies = await asyncio.gather(*(self.enqueue() for _ in range(chunk)))
            bad = [r for r in replies if r.status is not ScriptStatus.QUEUED]
            if bad:
                raise BenchError(f"d{self.depth}: {len(bad)} fill requests not queued: {bad[0]}")
            left -= chunk
        self.fill_s = time.perf_counter() - start

    async def step(self) -> None:
        """Release the held slot (dispatching the next item) and refill the queue by one."""
        reply = await self.store.release(self.held)
        if reply.status is not ScriptStatus.DISPATCHED or len(reply.deliveries) != 1:
            raise BenchError(f"d{self.depth}: release did not dispatch exactly one item: {reply}")
        (delivery,) = reply.deliveries
        if delivery.status is not ScriptStatus.DISPATCHED:
            raise BenchError(f"d{self.depth}: delivery is not a dispatch: {delivery}")
        self.held = delivery.item_id
        queued = await self.enqueue()
        if queued.status is not ScriptStatus.QUEUED:
            raise BenchError(f"d{self.depth}: refill request not queued: {queued}")

    async def timed_round(self, steps: int) -> None:
        before = await evalsha_usec(self.store.client)
        start = time.perf_counter()
        for _ in range(steps):
            await self.step()
        elapsed = time.perf_counter() - start
        after = await evalsha_usec(self.store.client)
        self.rates.append(steps / elapsed)
        # Server time of the step's two scripts (other clients of the same Redis would add to it).
        self.server_us.append((after - before) / steps)

    async def check_depth(self) -> None:
        stats = await self.store.client.hgetall(self.store.key("pool"))
        qn, inflight = int(stats.get(b"qn", 0)), int(stats.get(b"inflight", 0))
        if (qn, inflight) != (self.depth, 1):
            raise BenchError(
                f"d{self.depth}: expected {self.depth} queued and 1 in flight, "
                f"found {qn} and {inflight}"
            )


async def evalsha_usec(client: Any) -> int:
    """Server µs spent in EVALSHA so far (redis-py runs every script by EVALSHA once loaded)."""
    stats: dict[str, Any] = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("usec", 0))


async def drop_pool(client: Any, pool: str) -> None:
    """Removes a bench pool's keys, so a shared Redis starts (and ends) without them."""
    pattern = pool_prefix(pool) + "*"
    batch: list[Any] = []
    async for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            await client.unlink(*batch)
            batch.clear()
    if batch:
        await client.unlink(*batch)


async def measure(
    depths: Sequence[int], steps: int, rounds: int, redis_url: str
) -> list[DepthPool]:
    """Fills one pool per depth, then times ``rounds`` rounds of ``steps`` steps for each,
    alternating depths within every round."""
    client: Any = Redis.from_pool(
        BlockingConnectionPool.from_url(redis_url, max_connections=FILL_CONNECTIONS)
    )
    pools = [DepthPool(d, PoolStore(client, bench_config(d), REPLICA)) for d in depths]
    try:
        for pool in pools:
            await drop_pool(client, pool.store.config.pool)
            await pool.fill()
        warmup = max(1, steps // 10)
        for pool in pools:
            for _ in range(warmup):
                await pool.step()
        for _ in range(rounds):
            for pool in pools:
                await pool.timed_round(steps)
        for pool in pools:
            await pool.check_depth()
    finally:
        for pool in pools:
            await drop_pool(client, pool.store.config.pool)
        await client.aclose()
    return pools


async def run(
    depths: list[int], steps: int, rounds: int, redis_url: str | None
) -> dict[int, float]:
    """Steps per second for each depth: the best of its rounds."""
    pools = await _measure_with_server(depths, steps, rounds, redis_url)
    return {pool.depth: max(pool.rates) for pool in pools}


async def _measure_with_server(
    depths: Sequence[int], steps: int, rounds: int, redis_url: str | None
) -> list[DepthPool]:
    if not depths or len(set(depths)) != len(depths) or min(depths) < 1:
        raise ValueError(f"depths must be distinct and >= 1: {depths}")
    if steps < 1 or rounds < 1:
        raise ValueError("steps and rounds must be >= 1")
    if redis_url is not None:
        return await measure(depths, steps, rounds, redis_url)
    server = RedisProcess().start()
    try:
        return await measure(depths, steps, rounds, server.url)
    finally:
        server.stop()


def report(pools: Sequence[DepthPool]) -> tuple[str, bool]:
    """A markdown table and whether the deepest queue meets the target against the shallowest."""
    ordered = sorted(pools, key=lambda pool: pool.depth)
    base = max(ordered[0].rates)
    lines = [
        "| depth | steps/s (best) | steps/s (median) | server µs/step (min) | ratio (best) "
        "| fill s |",
        "|------:|---------------:|-----------------:|---------------------:|-------------:"
        "|-------:|",
    ]
    for pool in ordered:
        best = max(pool.rates)
        lines.append(
            f"| {pool.depth:,} | {best:,.0f} | {statistics.median(pool.rates):,.0f} "
            f"| {min(pool.server_us):.1f} | {best / base:.3f} | {pool.fill_s:.1f} |"
        )
    ratio = max(ordered[-1].rates) / base
    ok = math.isfinite(ratio) and ratio >= TARGET_RATIO
    verdict = "PASS" if ok else "FAIL"
    lines.append("")
    lines.append(
        f"rate(d{ordered[-1].depth}) / rate(d{ordered[0].depth}) = {ratio:.3f} "
        f"(best of {len(ordered[0].rates)} rounds; target >= {TARGET_RATIO}): {verdict}"
    )
    return "\n".join(lines), ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.dispatch_depth",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--depths", default="100,100000", help="queue depths, comma-separated (default: 100,100000)"
    )
    parser.add_argument("--steps", type=int, default=3000, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per depth")
    parser.add_argument(
        "--redis-url",
        default=None,
        help="an existing Redis (default: start a private redis-server)",
    )
    args = parser.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",") if d.strip()]
    pools = asyncio.run(_measure_with_server(depths, args.steps, args.rounds, args.redis_url))
    table, ok = report(pools)
    print(table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
