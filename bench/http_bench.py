"""The HTTP benchmark: rows 1, 2, 3 and 5 of the benchmark issue, each side by side in one run.

    python -m bench.http_bench [--quick] [--row1] [--rounds N]

Every server runs in a process of its own (uvloop where installed), so the two cores are shared
the same way in each leg: the fast upstream, the server under test (the sidecar, ``python -m
sidecar serve`` on a private redis-server with capacity effectively free, or a baseline from
``bench.bare_proxy``) and the load generator (``bench.loadgen``). Legs alternate within every
round (baseline, sidecar, baseline, sidecar, ...) so the machine's noise hits both alike.

1. Proxy throughput, closed loop: best round of the sidecar / best round of the bare proxy.
2. Added latency, open loop at a fixed rate (a fraction of the slower proxy's best throughput in
   row 1): the sidecar's p50 and p99 minus the bare proxy's, each leg's best (lowest) round.
3. Admission API: admit + release pairs per second (best round) / the best requests per second
   of an aiohttp handler doing one EVALSHA of ``return 1`` per request on the same Redis. A pair
   is two HTTP calls and two scripts, so 0.5 means one admission call costs what one baseline
   request costs.
5. Wake-up across replicas: two flow controllers (in this process, each with its own Redis
   clients) share one pool with maxConcurrency 1; the time from the holder's ``release`` call
   to the other's queued request returning from its wait. No baseline: judged absolutely.

The notes add each process's CPU time per HTTP call (from /proc), which the machine's other load
sways less than requests per second do; row 1's notes also give the bare proxy's CPU per call over
the sidecar's (what the throughput ratio would be if each proxy had a core to itself). On a shared
machine the best of 3 rounds swings by about 0.1 between runs: ``--rounds`` takes more.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, NamedTuple

import msgspec

from bench.loadgen import Result, percentile, run_loop
from bench.report import Row, markdown_table
from sidecar.config import load_config
from sidecar.controller import Admission, FlowController, Pending
from sidecar.request import FlowControlRequest
from sidecar.store import PoolStore
from sidecar.store.connect import connect
from sidecar.workload import WorkloadContext
from tests.redis_proc import RedisProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
THROUGHPUT_TARGET = 0.8
ADDED_P50_TARGET_MS, ADDED_P99_TARGET_MS = 1.0, 5.0
API_TARGET = 0.5
WAKE_P50_TARGET_MS, WAKE_P99_TARGET_MS = 1.0, 5.0
# The latency legs run open loop at this fraction of the slower proxy's best closed-loop rate.
MODERATE_FRACTION = 0.3
CHAT_PATH = "/v1/chat/completions"
CHAT_BODY = '{"model":"m","messages":[{"role":"user","content":"hi"}]}'
CLASSIFY_HEADERS = ("x-workload-id: bench", "x-workload-criticality: 3")
# Capacity is free, so admission takes its fast path: nothing ever queues.
SIDECAR_CONFIG = """\
pool: bench-http
saturationDetector: {parameters: {maxConcurrency: 100000}}
"""
WAKE_POOL = "bench-wake"
# Names of the watched processes in the notes.
BARE, SIDECAR = "bare proxy", "sidecar"
READY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Plan:
    rounds: int  # alternations of baseline and sidecar per row
    duration_s: float  # measured seconds per leg
    warmup_s: float  # seconds per leg run but not counted
    connections: int
    wake_iterations: int


FULL = Plan(rounds=3, duration_s=4.0, warmup_s=0.5, connections=32, wake_iterations=2000)
QUICK = Plan(rounds=1, duration_s=0.6, warmup_s=0.2, connections=8, wake_iterations=50)


class BenchError(RuntimeError):
    """A process failed or a leg measured nothing: the figures would be meaningless."""


@dataclass
class Served:
    name: str
    port: int
    proc: asyncio.subprocess.Process
    log: IO[bytes]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_tail(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-2000:]


@dataclass
class Fleet:
    """The processes of one run; ``stop`` ends every one of them."""

    workdir: Path
    served: list[Served] = field(default_factory=list)

    async def serve(self, name: str, *args: str) -> Served:
        port = free_port()
        log = (self.workdir / f"{name}.log").open("w+b")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            *(a.replace("{port}", str(port)) for a in args),
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        served = Served(name, port, proc, log)
        self.served.append(served)
        return served

    async def ready(self, served: Served) -> None:
        """Waits until the process accepts connections on its port."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if served.proc.returncode is not None:
                raise BenchError(f"{served.name} exited: {served.log_tail()}")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection(HOST, served.port)
                writer.close()
                await writer.wait_closed()
                return
            await asyncio.sleep(0.05)
        raise BenchError(f"{served.name} did not listen on {served.port}: {served.log_tail()}")

    async def stop(self) -> None:
        for served in self.served:
            if served.proc.returncode is None:
                served.proc.terminate()
        for served in self.served:
            try:
                await asyncio.wait_for(served.proc.wait(), 10)
            except TimeoutError:
                served.proc.kill()
                await served.proc.wait()
            served.log.close()
        self.served.clear()


@dataclass(frozen=True)
class Target:
    """Where a leg sends its load, and the processes whose CPU time it charges to the leg."""

    url: str
    watch: dict[str, int]  # name -> pid


class Measured(NamedTuple):
    result: Result
    cpu_us: dict[str, float]  # CPU µs per HTTP call of each watched process


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; nan elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(
    target: Target,
    plan: Plan,
    *,
    rate: float | None = None,
    pairs: bool = False,
    post: str | None = None,
) -> Measured:
    """One leg: runs ``bench.loadgen`` in its own process and reads its JSON line."""
    args = [
        target.url,
        f"--connections={plan.connections}",
        f"--duration={plan.duration_s}",
        f"--warmup={plan.warmup_s}",
        *(f"--header={h}" for h in CLASSIFY_HEADERS),
    ]
    if rate is not None:
        args.append(f"--rate={rate:.1f}")
    if pairs:
        args.append("--pairs")
    if post is not None:
        args += ["--method=POST", f"--body={post}"]
    cpu_before = {name: cpu_seconds(pid) for name, pid in target.watch.items()}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.loadgen",
        *args,
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), plan.duration_s + 60)
    except TimeoutError:
        proc.kill()
        await proc.communicate()
        raise BenchError(f"load generator on {target.url} did not finish") from None
    if proc.returncode != 0:
        raise BenchError(f"load generator on {target.url} failed: {err.decode()[-2000:]}")
    result = msgspec.json.decode(out.splitlines()[-1], type=Result)
    if result.requests == 0:
        raise BenchError(f"nothing answered on {target.url}: {result.first_error}")
    cpu_us = {
        name: (cpu_seconds(pid) - cpu_before[name]) / result.http_calls * 1e6
        for name, pid in target.watch.items()
    }
    return Measured(result, cpu_us)


@dataclass
class Legs:
    """The rounds of a baseline and the sidecar, measured alternately."""

    baseline: list[Measured] = field(default_factory=list)
    sidecar: list[Measured] = field(default_factory=list)

    def results(self, side: list[Measured]) -> list[Result]:
        return [m.result for m in side]

    def best_rps(self) -> tuple[float, float]:
        return (
            max(m.result.rps for m in self.baseline),
            max(m.result.rps for m in self.sidecar),
        )

    def rounds(self) -> str:
        base = ", ".join(f"{m.result.rps:,.0f}" for m in self.baseline)
        ours = ", ".join(f"{m.result.rps:,.0f}" for m in self.sidecar)
        return f"Rounds: baseline {base}; sidecar {ours}."

    def cpu(self) -> str:
        """Median CPU per HTTP call of each watched process, over the rounds."""
        parts = []
        for label, side in (("baseline", self.baseline), ("sidecar", self.sidecar)):
            for name in side[0].cpu_us:
                us = statistics.median(m.cpu_us[name] for m in side)
                if math.isfinite(us):
                    parts.append(f"{name} {us:,.0f}")
            parts[-1] += f" ({label} leg)"
        return f" CPU µs per HTTP call (median of rounds): {'; '.join(parts)}." if parts else ""

    def cpu_ratio(self, base: str, ours: str) -> str:
        """The baseline's median CPU per call over the sidecar's (a ratio like row 1's)."""
        base_us = statistics.median(m.cpu_us[base] for m in self.baseline)
        ours_us = statistics.median(m.cpu_us[ours] for m in self.sidecar)
        if not (math.isfinite(base_us) and math.isfinite(ours_us)) or ours_us <= 0:
            return ""
        return f" CPU per call, {base} / {ours}: {base_us / ours_us:.2f}."

    def errors(self) -> str:
        base = sum(m.result.errors for m in self.baseline)
        ours = sum(m.result.errors for m in self.sidecar)
        errors = (m.result.first_error for m in self.sidecar + self.baseline)
        first = next((e for e in errors if e), "")
        return f" Errors: baseline {base}, sidecar {ours} ({first})." if base or ours else ""


async def alternate(
    plan: Plan,
    baseline: Target,
    sidecar: Target,
    *,
    post: str,
    rate: float | None = None,
    pairs: bool = False,
) -> Legs:
    """``pairs``: the sidecar leg runs admit+release pairs, the baseline plain POSTs."""
    legs = Legs()
    for _ in range(plan.rounds):
        legs.baseline.append(await load(baseline, plan, rate=rate, post=post))
        legs.sidecar.append(
            await load(sidecar, plan, rate=rate, post=None if pairs else post, pairs=pairs)
        )
    return legs


def _fmt_rps(value: float, unit: str = "req/s") -> str:
    return f"{value:,.0f} {unit}"


def throughput_row(legs: Legs, plan: Plan) -> Row:
    base, ours = legs.best_rps()
    ratio = ours / base
    return Row(
        number=1,
        measurement="proxy throughput, capacity free: sidecar / bare aiohttp proxy",
        ours=_fmt_rps(ours),
        baseline=_fmt_rps(base),
        result=f"{ratio:.2f}",
        target=f">= {THROUGHPUT_TARGET}",
        passed=math.isfinite(ratio) and ratio >= THROUGHPUT_TARGET,
        notes=(
            f"Closed loop, {plan.connections} keep-alive connections, POST {CHAT_PATH}; best of "
            f"{plan.rounds} alternating rounds of {plan.duration_s:g} s per leg. "
            + legs.rounds()
            + legs.cpu()
            + legs.cpu_ratio(BARE, SIDECAR)
            + legs.errors()
        ),
    )


def latency_row(legs: Legs, plan: Plan, rate: float) -> Row:
    base, ours = legs.results(legs.baseline), legs.results(legs.sidecar)
    base50, base99 = min(r.p50_ms for r in base), min(r.p99_ms for r in base)
    ours50, ours99 = min(r.p50_ms for r in ours), min(r.p99_ms for r in ours)
    d50, d99 = ours50 - base50, ours99 - base99
    return Row(
        number=2,
        measurement="added latency of admission at moderate load, vs the bare proxy",
        ours=f"p50 {ours50:.2f} ms, p99 {ours99:.2f} ms",
        baseline=f"p50 {base50:.2f} ms, p99 {base99:.2f} ms",
        result=f"p50 {d50:+.2f} ms, p99 {d99:+.2f} ms",
        target=f"p50 <= +{ADDED_P50_TARGET_MS:g} ms, p99 <= +{ADDED_P99_TARGET_MS:g} ms",
        passed=d50 <= ADDED_P50_TARGET_MS and d99 <= ADDED_P99_TARGET_MS,
        notes=(
            f"Open loop at {rate:,.0f} req/s ({MODERATE_FRACTION:.0%} of the slower proxy's best "
            f"in row 1) over {plan.connections} connections; latency counted from when each "
            f"request was due. Each percentile is the best (lowest) of {plan.rounds} alternating "
            "rounds per leg. p50/p99 per round: baseline "
            + ", ".join(f"{r.p50_ms:.2f}/{r.p99_ms:.2f}" for r in base)
            + "; sidecar "
            + ", ".join(f"{r.p50_ms:.2f}/{r.p99_ms:.2f}" for r in ours)
            + " ms."
            + legs.errors()
        ),
    )


def api_row(legs: Legs, plan: Plan) -> Row:
    base, ours = legs.best_rps()
    ratio = ours / base
    return Row(
        number=3,
        measurement="admission API fast path: admit+release pairs/s vs one-EVALSHA handler req/s",
        ours=_fmt_rps(ours, "pairs/s") + f" ({2 * ours:,.0f} calls/s)",
        baseline=_fmt_rps(base),
        result=f"{ratio:.2f}",
        target=f">= {API_TARGET}",
        passed=math.isfinite(ratio) and ratio >= API_TARGET,
        notes=(
            f"Closed loop, {plan.connections} connections each doing POST admit then POST release "
            "with the ticket, against POST to an aiohttp handler running one EVALSHA of "
            "'return 1' (same Redis client settings, same Redis server). A pair is two HTTP "
            "calls and two scripts, so 0.5 = one admission call costs what one baseline "
            f"request costs. Best of {plan.rounds} alternating rounds. "
            + legs.rounds()
            + legs.cpu()
            + legs.errors()
        ),
    )


async def wake_latencies(redis_url: str, iterations: int) -> list[float]:
    """Seconds from the holder's release call to the waiter's queued request returning."""
    config = load_config(
        {"pool": WAKE_POOL, "saturationDetector": {"parameters": {"maxConcurrency": 1}}}
    )
    replicas: list[FlowController] = []
    clients: list[Any] = []
    for name in ("replica-a", "replica-b"):
        client, inbox = connect(redis_url, config.redis.timeout, config.redis.max_connections)
        clients += [client, inbox]
        replicas.append(FlowController(PoolStore(client, config, name, inbox_client=inbox)))
    try:
        for replica in replicas:
            await replica.start()
        holder, waiter = replicas
        workload = WorkloadContext("bench", 3)
        held = await holder.enqueue_and_wait(FlowControlRequest("held", workload=workload))
        latencies: list[float] = []
        for n in range(iterations):
            # submit + result is enqueue_and_wait, split where the request is known to be queued.
            pending = await waiter.submit(FlowControlRequest(f"w{n}", workload=workload))
            if pending.admission is not None:
                raise BenchError(f"the waiter was not queued: {pending.admission}")
            task = asyncio.create_task(_answered(pending))
            await asyncio.sleep(0)  # the task is now awaiting its wake-up
            released = time.perf_counter()
            await holder.release(held.item_id)
            held, answered = await task
            if not held.admitted:
                raise BenchError(f"the queued request was not dispatched: {held}")
            latencies.append(answered - released)
            holder, waiter = waiter, holder
        await holder.release(held.item_id)
        return latencies
    finally:
        for replica in replicas:
            await replica.stop(deregister=True)
        for client in clients:
            await client.aclose()


async def _answered(pending: Pending) -> tuple[Admission, float]:
    admission = await pending.result()
    return admission, time.perf_counter()


def wake_row(latencies: list[float]) -> Row:
    ordered = sorted(latencies)
    p50, p99 = percentile(ordered, 0.5) * 1000, percentile(ordered, 0.99) * 1000
    return Row(
        number=5,
        measurement="wake-up latency: release on replica A -> queued request on B answered",
        ours=f"p50 {p50:.2f} ms, p99 {p99:.2f} ms",
        baseline="-",
        result=f"p50 {p50:.2f} ms, p99 {p99:.2f} ms",
        target=f"p50 <= {WAKE_P50_TARGET_MS:g} ms, p99 <= {WAKE_P99_TARGET_MS:g} ms",
        passed=p50 <= WAKE_P50_TARGET_MS and p99 <= WAKE_P99_TARGET_MS,
        notes=(
            f"{len(latencies)} hand-overs; two FlowControllers in the bench process (one event "
            "loop), each with its own Redis clients, on one pool with maxConcurrency 1, roles "
            "swapping each time. Measured from the release call's start to the waiter's "
            "result returning (the release script LPUSHes to B's inbox; B's BLPOP wakes it)."
        ),
    )


@contextlib.asynccontextmanager
async def processes() -> AsyncIterator[tuple[RedisProcess, dict[str, Served]]]:
    """A private redis-server and every server process of the run, stopped at the end."""
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-http-bench-"))
    redis = RedisProcess().start()
    fleet = Fleet(workdir)
    listen = f"--listen={HOST}:{{port}}"
    try:
        config = workdir / "sidecar.yaml"
        config.write_text(SIDECAR_CONFIG)
        upstream = await fleet.serve("upstream", "bench.bare_proxy", listen, "--serve-upstream")
        upstream_flag = f"--upstream={upstream.url}"
        servers = {
            "upstream": upstream,
            "bare": await fleet.serve("bare", "bench.bare_proxy", listen, upstream_flag),
            "evalsha": await fleet.serve(
                "evalsha", "bench.bare_proxy", listen, f"--serve-evalsha={redis.url}"
            ),
            # Log level warning turns the access log off: the bare proxy writes none either.
            "sidecar": await fleet.serve(
                "sidecar",
                "sidecar",
                "--log-level=warning",
                "serve",
                f"--config={config}",
                listen,
                f"--admin-listen={HOST}:{free_port()}",
                f"--redis-url={redis.url}",
                upstream_flag,
            ),
        }
        for served in servers.values():
            await fleet.ready(served)
        yield redis, servers
    finally:
        await fleet.stop()
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def run(
    quick: bool = False, throughput_only: bool = False, rounds: int | None = None
) -> list[Row]:
    """Rows 1, 2, 3 and 5; ``quick`` runs each for a moment (a smoke test, not a measurement);
    ``throughput_only`` stops after row 1 (for iterating on the proxy's hot path); ``rounds``
    overrides the plan's alternations per row."""
    plan = QUICK if quick else FULL
    if rounds is not None:
        plan = replace(plan, rounds=rounds)
    async with processes() as (redis, servers):
        pid = {name: served.proc.pid for name, served in servers.items()}
        redis_pid = redis.proc.pid if redis.proc else -1
        bare = Target(servers["bare"].url + CHAT_PATH, {BARE: pid["bare"]})
        sidecar = Target(
            servers["sidecar"].url + CHAT_PATH, {SIDECAR: pid["sidecar"], "Redis": redis_pid}
        )
        throughput = await alternate(plan, bare, sidecar, post=CHAT_BODY)
        if throughput_only:
            return [throughput_row(throughput, plan)]
        # Moderate for both: a load the bare proxy shrugs off can be most of the sidecar's
        # capacity while row 1 misses, and then queueing, not admission, sets the latency.
        rate = MODERATE_FRACTION * min(throughput.best_rps())
        latency = await alternate(plan, bare, sidecar, post=CHAT_BODY, rate=rate)
        evalsha = Target(
            servers["evalsha"].url + "/", {"EVALSHA handler": pid["evalsha"], "Redis": redis_pid}
        )
        api = Target(servers["sidecar"].url, sidecar.watch)
        api_legs = await alternate(plan, evalsha, api, post="{}", pairs=True)
        wake = await wake_latencies(redis.url, plan.wake_iterations)
    return [
        throughput_row(throughput, plan),
        latency_row(latency, plan, rate),
        api_row(api_legs, plan),
        wake_row(wake),
    ]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.http_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a few seconds in all (smoke test)")
    parser.add_argument("--row1", action="store_true", help="only row 1 (proxy throughput)")
    parser.add_argument(
        "--rounds",
        type=_positive,
        help=f"alternating rounds per row (default {FULL.rounds}; {QUICK.rounds} with --quick)",
    )
    args = parser.parse_args(argv)
    rows: list[Row] = []

    async def go() -> None:
        rows.extend(await run(quick=args.quick, throughput_only=args.row1, rounds=args.rounds))

    run_loop(go())
    print(markdown_table(rows))
    for row in sorted(rows, key=lambda r: r.number):
        print(f"\n{row.number}. {row.notes}")
    return 0 if all(row.passed is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
