"""The chaos run: N ``serve`` replicas on one Redis, load above capacity, faults on a schedule.

    python -m bench.chaos --short        # CI: about 75 s, 3 replicas, 2 kills, 1 pause, 1 restart
    python -m bench.chaos --long         # >= 10 min, >= 20 kills, >= 5 pauses, >= 3 restarts

It starts its own redis-server (persisting nothing) on a free loopback port, a recording
upstream (bench/recording_upstream.py), the replicas (bench/procs.py) and closed-loop clients
(bench/chaos_load.py); SIGKILLs and restarts replicas, SIGSTOPs one past its lease and SIGCONTs
it, restarts Redis empty (bench/chaos_faults.py); then judges the invariants
(bench/chaos_check.py), prints a table and exits 1 if any broke. docs/reliability.md says what
each invariant means and how it is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
from redis.exceptions import RedisError

from bench.chaos_check import RunData, Summary, judge
from bench.chaos_faults import FaultRunner, leftovers, pool_counts, schedule
from bench.chaos_load import Generations, run_load
from bench.chaos_report import render
from bench.procs import RedisServer, Replica, free_port, workdir
from bench.recording_upstream import RecordingUpstream

POOL = "chaos"
SERVICE_S = (0.1, 0.3)
WARMUP_S = 3.0  # not judged: replicas and clients settle
DRAIN_MARGIN_S = 2.0  # in-flight and queued must be 0 within leaseTimeout + this
RECOVERY_MARGIN_S = 2.0  # a fault window lasts until leaseTimeout + this after the fault ended
DRAIN_POLL_S = 0.1
SAMPLE_S = 0.25

PRESETS = {
    "short": {"replicas": 3, "duration": 60.0, "kills": 2, "pauses": 1, "redis_restarts": 1},
    "long": {"replicas": 4, "duration": 660.0, "kills": 22, "pauses": 6, "redis_restarts": 4},
}


@dataclass
class Options:
    replicas: int = 3
    duration: float = 60.0
    max_concurrency: int = 6
    lease_timeout: float = 3.0
    kills: int = 2
    pauses: int = 1
    redis_restarts: int = 1
    clients: int = 0  # 0: 2.5 x max_concurrency
    seed: int = 1
    keep: bool = False

    @property
    def client_count(self) -> int:
        return self.clients or int(self.max_concurrency * 2.5)

    @property
    def long_s(self) -> tuple[float, float]:
        """Long generations outlast a lease: they still run when a paused replica's lapses."""
        return (self.lease_timeout + 1.0, self.lease_timeout + 3.0)

    @property
    def margin_s(self) -> float:
        return self.lease_timeout + RECOVERY_MARGIN_S


def write_config(directory: Path, o: Options) -> Path:
    path = directory / "config.yaml"
    path.write_text(
        f"pool: {POOL}\n"
        f"saturationDetector: {{parameters: {{maxConcurrency: {o.max_concurrency}}}}}\n"
        "flowControl: {defaultRequestTTL: 10s}\n"
        "server: {shutdownGracePeriod: 2s}\n"
        f"redis: {{leaseTimeout: {o.lease_timeout}s, heartbeatInterval: 500ms, "
        "maintenanceInterval: 500ms}\n"
    )
    return path


async def drain_time(url: str, bound_s: float) -> float | None:
    """Seconds until Redis shows 0 in flight and 0 queued; None if not within twice the bound."""
    start = time.monotonic()
    while (waited := time.monotonic() - start) <= 2 * bound_s:
        try:
            if await pool_counts(url, POOL) == (0, 0):
                return round(waited, 2)
        except (OSError, RedisError):
            pass
        await asyncio.sleep(DRAIN_POLL_S)
    return None


async def sample_pool(url: str, into: list[tuple[float, int, int]]) -> None:
    """Reads the pool's in-flight and queued counts until cancelled (Redis may be down)."""
    while True:
        try:
            inflight, queued = await pool_counts(url, POOL)
            into.append((time.monotonic(), inflight, queued))
        except (OSError, RedisError):
            pass
        await asyncio.sleep(SAMPLE_S)


async def run(o: Options) -> tuple[Summary, Path]:
    work = workdir()
    redis = RedisServer(work)
    upstream = RecordingUpstream(SERVICE_S, o.seed)
    replicas: list[Replica] = []
    try:
        await redis.start()
        upstream_url = await upstream.start(free_port())
        config = write_config(work, o)
        replicas = [Replica(i, redis.url, upstream_url, config) for i in range(o.replicas)]
        await asyncio.gather(*(r.start() for r in replicas))
        gens = Generations(o.replicas)
        tail = o.margin_s + DRAIN_MARGIN_S
        faults = schedule(
            o.kills,
            o.pauses,
            o.redis_restarts,
            o.replicas,
            (WARMUP_S + 3, o.duration - tail),
            o.seed,
        )
        load_start = time.monotonic()
        until = load_start + o.duration
        chaos = asyncio.create_task(
            FaultRunner(redis, replicas, gens, o.lease_timeout, POOL).run(faults, load_start)
        )
        load = asyncio.create_task(
            run_load([r.url for r in replicas], o.client_count, until, gens, o.seed, o.long_s)
        )
        samples: list[tuple[float, int, int]] = []
        sampler = asyncio.create_task(sample_pool(redis.url, samples))
        try:
            done, _ = await asyncio.wait([chaos, load], return_when=asyncio.FIRST_EXCEPTION)
            if chaos in done:
                chaos.result()  # a fault that could not be applied ends the run here
            stats = await load
            await chaos
        finally:
            for task in (chaos, load, sampler):
                task.cancel()
        drain = await drain_time(redis.url, o.lease_timeout + DRAIN_MARGIN_S)
        data = RunData(
            limit=o.max_concurrency,
            lease_s=o.lease_timeout,
            margin_s=o.margin_s,
            measured=(load_start + WARMUP_S, until),
            upstream=upstream.records,
            clients=stats.records,
            faults=faults,
            replicas=o.replicas,
            now=time.monotonic(),
            pool_samples=samples,
        )
        summary = judge(data, load_start)
        dump_records(work / "records.json", data, load_start)
        summary.drain_s = drain
        summary.refused = stats.refused
        summary.all_refused = stats.all_refused
        bound = o.lease_timeout + DRAIN_MARGIN_S
        if drain is None or drain > bound:
            took = f"more than {2 * bound:g}" if drain is None else f"{drain:g}"
            summary.violations.append(
                f"in flight / queued in Redis not 0 within {bound:g}s after the load stopped "
                f"(took {took}s; {await leftovers(redis.url, POOL)})"
            )
        return summary, work
    finally:
        for r in replicas:
            r.kill()
        await upstream.stop()
        redis.kill()


def dump_records(path: Path, data: RunData, load_start: float) -> None:
    """Raw records (times in seconds after the load started), for a look at a failed run."""

    def rel(t: float) -> float:
        return round(t - load_start, 4) if t >= 0 else -1.0

    raw = {
        "upstream": [[u.request_id, rel(u.start), rel(u.end), u.cancelled] for u in data.upstream],
        "clients": [
            [c.request_id, rel(c.sent), rel(c.done), c.kind, c.status, c.outcome, c.error]
            for c in data.clients
        ],
        "faults": [[f.label, rel(f.at), rel(f.end), f.held] for f in data.faults],
    }
    path.write_bytes(msgspec.json.encode(raw))


def parse(argv: Sequence[str] | None) -> tuple[Options, bool]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument(
        "--short", action="store_true", help="CI preset, under 2 minutes (also the default)"
    )
    preset.add_argument("--long", action="store_true", help="soak preset (over 10 minutes)")
    d = Options()
    parser.add_argument("--replicas", type=int, help=f"serve processes [{d.replicas}]")
    parser.add_argument("--duration", type=float, help=f"seconds of load [{d.duration:.0f}]")
    parser.add_argument("--max-concurrency", type=int, default=d.max_concurrency)
    parser.add_argument("--lease-timeout", type=float, default=d.lease_timeout, help="seconds")
    parser.add_argument("--kills", type=int, help=f"replica SIGKILL + restarts [{d.kills}]")
    parser.add_argument("--pauses", type=int, help=f"SIGSTOP past the lease + SIGCONT [{d.pauses}]")
    parser.add_argument("--redis-restarts", type=int, help=f"empty restarts [{d.redis_restarts}]")
    parser.add_argument("--clients", type=int, default=0, help="default 2.5 x max-concurrency")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--keep", action="store_true", help="keep the work dir (replica logs)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    values = dict(PRESETS["long" if args.long else "short"])
    for key in values:
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    o = Options(
        **values,  # type: ignore[arg-type]
        max_concurrency=args.max_concurrency,
        lease_timeout=args.lease_timeout,
        clients=args.clients,
        seed=args.seed,
        keep=args.keep,
    )
    if o.replicas < 1 or o.max_concurrency < 1 or o.lease_timeout <= 0.5:
        parser.error("--replicas and --max-concurrency must be >= 1, --lease-timeout > 0.5")
    if min(o.kills, o.pauses, o.redis_restarts) < 0:
        parser.error("fault counts must be >= 0")
    faults = o.kills + o.pauses + o.redis_restarts
    if o.duration < WARMUP_S + 3 + o.margin_s + DRAIN_MARGIN_S + faults * 2 * o.margin_s:
        parser.error(f"--duration {o.duration:.0f}s is too short for {faults} faults")
    return o, args.json


def main(argv: Sequence[str] | None = None) -> int:
    o, as_json = parse(argv)

    async def go() -> tuple[Summary, Path]:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await run(o)

    summary, work = asyncio.run(go())
    if as_json:
        sys.stdout.buffer.write(msgspec.json.encode(summary) + b"\n")
    else:
        print(render(summary, o.replicas, o.lease_timeout, o.seed))
    if o.keep or summary.violations:
        print(f"replica logs: {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if summary.violations else 0


if __name__ == "__main__":
    sys.exit(main())
