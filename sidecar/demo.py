"""``admission-sidecar demo``: the whole stack on loopback, overloaded on purpose, in one table.

A simulated OpenAI-compatible model server with a few slots, a sidecar replica in front of it on
the embedded store, and four workloads of different criticality and rate sending streamed chat
completions through the sidecar's HTTP port. The workloads together offer more than the pool can
serve, so requests queue and the workload-aware policy decides who waits and who gives up. At the
end each workload's admitted and rejected requests and its p50/p95 queue wait are printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import socket
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import aiohttp

from sidecar.classify import CRITICALITY_HEADER, REQUEST_ID_HEADER, WORKLOAD_ID_HEADER
from sidecar.config import Config, load_config
from sidecar.http.app import Server
from sidecar.http.outcomes import OUTCOME_HEADER, WAIT_HEADER
from sidecar.options import ServeOptions
from sidecar.simulator import SimulatedModel, start_app

HOST = "127.0.0.1"

# The model pool: SLOTS completions at once, each ~0.25 s to the first token plus MAX_TOKENS
# streamed tokens 20 ms apart, so ~0.5 s per completion and ~8 completions per second in all.
SLOTS = 4
FIRST_TOKEN_S = 0.25
TOKEN_DELAY_S = 0.02
MAX_TOKENS = 12
SERVICE_S = FIRST_TOKEN_S + MAX_TOKENS * TOKEN_DELAY_S

# A request that cannot be dispatched within this long is rejected (429, evicted_ttl): in an
# overload somebody must give up, and the policy decides who.
TTL_S = 4.0
# The workload-aware score's scales (see demo_config).
MAX_WAIT_S = 10.0
MAX_RATE = 10.0
PROGRESS_EVERY_S = 2.0
# Arrival times are seeded, so runs differ only by what the machine's timing adds.
SEED = 20240601


@dataclass(frozen=True)
class Workload:
    """A simulated client sending ``rate`` requests per second, ``burst`` at a time."""

    name: str
    criticality: int
    rate: float
    role: str
    burst: int = 1


# ~13 req/s offered against ~8 req/s of capacity. The three interactive workloads alone would
# nearly fit; the batch job pushes the pool well past saturation.
WORKLOADS = (
    Workload("checkout-assistant", 5, 2.0, "customer-facing, must stay fast"),
    Workload("support-chat", 4, 2.5, "customer-facing"),
    Workload("internal-tools", 3, 2.5, "employees, can wait a little"),
    Workload("nightly-batch", 1, 6.0, "background job, bursts of 6 prompts", burst=6),
)


def demo_config(model_url: str | None = None) -> Config:
    """The pool's policy, scaled to a demo that lasts seconds rather than hours. With
    ``model_url``, the utilization detector reads the simulated model server's own /metrics
    (vLLM's names) instead of counting requests against a fixed limit."""
    detector: dict[str, Any] = {"parameters": {"maxConcurrency": SLOTS}}
    if model_url is not None:
        detector = {"type": "utilization-detector", "parameters": {"endpoints": [model_url]}}
    return load_config(
        {
            "saturationDetector": detector,
            "flowControl": {
                # Generous queues: nothing is refused for lack of room, only for waiting too long.
                "maxRequests": 10_000,
                "defaultRequestTTL": f"{TTL_S}s",
                "defaultPriorityBand": {
                    "orderingPolicy": {
                        "type": "workload-aware-ordering-policy",
                        # The reference scales (the wait term saturates at 60 s, the rate term at
                        # 100 req/s) suit a production pool. Here waits are seconds and rates a few
                        # per second, so with those scales both terms would stay near 0 and only
                        # criticality would count. Scaled to the demo, all three terms matter: one
                        # criticality step (0.4/5) is worth 2 s more average wait, and the batch
                        # job's 6 req/s costs it 1.5 steps.
                        "parameters": {
                            "maxWaitTimeSeconds": MAX_WAIT_S,
                            "maxRequestRate": MAX_RATE,
                        },
                    },
                },
            },
            # A 60 s rate window would still be filling when the demo ends; 5 s reads the rates
            # correctly after a few seconds.
            "workloadRegistry": {"requestRateWindow": "5s"},
            "server": {"shutdownGracePeriod": "5s"},
        }
    )


def _percentile(values: list[int], q: float) -> int | None:
    """Nearest-rank percentile; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


@dataclass
class WorkloadStats:
    """What one workload saw. Waits are the sidecar's ``x-admission-wait-ms`` of admitted
    requests; latencies are measured by the client, from sending to the end of the stream."""

    name: str
    criticality: int
    rate: float
    sent: int = 0
    admitted: int = 0
    rejected: int = 0
    # Transport errors or statuses other than 200/429: there should be none.
    failed: int = 0
    waits_ms: list[int] = field(default_factory=list)
    latencies_ms: list[int] = field(default_factory=list)
    # Outcome header of each rejection (evicted_ttl, rejected_capacity) -> count.
    rejections: dict[str, int] = field(default_factory=dict)

    @property
    def wait_p50_ms(self) -> int | None:
        return _percentile(self.waits_ms, 0.50)

    @property
    def wait_p95_ms(self) -> int | None:
        return _percentile(self.waits_ms, 0.95)

    @property
    def latency_p50_ms(self) -> int | None:
        return _percentile(self.latencies_ms, 0.50)


@dataclass
class DemoReport:
    seconds: float
    slots: int
    workloads: list[WorkloadStats]
    # Most completions the model served at once: the sidecar must keep it at ``slots``.
    upstream_peak: int = 0


async def _send(
    session: aiohttp.ClientSession, url: str, workload: Workload, stats: WorkloadStats, n: int
) -> None:
    headers = {
        WORKLOAD_ID_HEADER: workload.name,
        CRITICALITY_HEADER: str(workload.criticality),
        REQUEST_ID_HEADER: f"{workload.name}-{n}",
    }
    body = {
        "model": "sim",
        "stream": True,
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": f"request {n} from {workload.name}"}],
    }
    stats.sent += 1
    started = time.perf_counter()
    try:
        async with session.post(url, json=body, headers=headers) as response:
            # Read to the end: the slot is held until the stream is over.
            async for _ in response.content.iter_any():
                pass
            status = response.status
            outcome = response.headers.get(OUTCOME_HEADER, "")
            wait_ms = int(response.headers.get(WAIT_HEADER, "0"))
    except (aiohttp.ClientError, TimeoutError, ValueError):
        stats.failed += 1
        return
    if status == 200:
        stats.admitted += 1
        stats.waits_ms.append(wait_ms)
        stats.latencies_ms.append(round((time.perf_counter() - started) * 1000))
    elif status == 429:
        stats.rejected += 1
        stats.rejections[outcome] = stats.rejections.get(outcome, 0) + 1
    else:
        stats.failed += 1


async def _traffic(
    session: aiohttp.ClientSession,
    url: str,
    workload: Workload,
    stats: WorkloadStats,
    until: float,
    rng: random.Random,
    requests: set[asyncio.Task[None]],
) -> None:
    """Open-loop arrivals: clients keep coming whether or not earlier ones were served.

    Gaps are jittered around their mean (not exponential): the rate sent is the rate printed,
    even in a short run, while arrivals still bunch up now and then."""
    loop = asyncio.get_running_loop()
    n = 0
    gap = workload.burst / workload.rate
    while True:
        await asyncio.sleep(gap * rng.uniform(0.5, 1.5))
        if loop.time() >= until:
            return
        for _ in range(workload.burst):
            n += 1
            task = asyncio.create_task(_send(session, url, workload, stats, n))
            requests.add(task)
            task.add_done_callback(requests.discard)


def _free_ports(n: int) -> list[int]:
    """Ports free right now (held open together, so they differ), for the sidecar to bind."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind((HOST, 0))
        return [int(s.getsockname()[1]) for s in sockets]


def _header(out: TextIO, seconds: float, options: ServeOptions) -> None:
    offered = sum(w.rate for w in WORKLOADS)
    capacity = SLOTS / SERVICE_S
    sidecar_host, sidecar_port = options.listen
    admin_host, admin_port = options.admin_listen
    token_ms = round(TOKEN_DELAY_S * 1000)
    lines = [
        f"admission-sidecar demo: {seconds:g} s of simulated LLM traffic through a real sidecar",
        "",
        f"  model     a simulated OpenAI-compatible server at {options.upstream}:",
        f"            {SLOTS} slots; a streamed completion takes ~{SERVICE_S:.1f} s (first token "
        f"after {FIRST_TOKEN_S:g} s,",
        f"            then {MAX_TOKENS} tokens {token_ms} ms apart): it serves ~{capacity:.0f} "
        "requests/s",
        f"  sidecar   http://{sidecar_host}:{sidecar_port} in front of it, on the embedded store "
        "(no Redis needed);",
        f"            its live state while the demo runs: curl http://{admin_host}:{admin_port}/state",
        *_detector_lines(options),
        "  policy    workload-aware ordering: high criticality goes first, a workload that sends",
        "            a lot is held back, one whose requests waited long is moved up; a request",
        f"            still queued after {TTL_S:g} s is rejected with 429",
        f"  traffic   ~{offered:.0f} requests/s offered, more than the pool can serve:",
        "",
        f"  {'workload':<20}{'criticality':>11}{'rate':>10}   role",
    ]
    lines += [f"  {w.name:<20}{w.criticality:>11}{w.rate:>8.1f}/s   {w.role}" for w in WORKLOADS]
    out.write("\n".join([*lines, "", ""]))
    out.flush()


def _detector_lines(options: ServeOptions) -> list[str]:
    if not options.config.utilization:
        return [f"  detector  concurrency-detector: at most {SLOTS} requests at the model at once"]
    return [
        f"  detector  utilization-detector: the model runs {SLOTS} requests, the rest wait inside;",
        "            the sidecar reads vllm:num_requests_waiting from its /metrics every 50 ms",
        "            and stops dispatching while 5 or more wait (queueDepthThreshold)",
    ]


def _progress_line(
    out: TextIO, elapsed: float, model: SimulatedModel, server: Server, stats: list[WorkloadStats]
) -> None:
    at_model = f"busy slots {model.in_flight}/{SLOTS}"
    if model.batch_slots is not None:
        at_model = f"at the model {model.running} running + {model.waiting} waiting"
    out.write(
        f"  t={elapsed:4.0f}s   {at_model}   "
        f"queued {server.service.controller.waiting:4d}   "
        f"admitted {sum(s.admitted for s in stats):4d}   "
        f"rejected {sum(s.rejected for s in stats):4d}\n"
    )
    out.flush()


async def _progress(
    out: TextIO, started: float, model: SimulatedModel, server: Server, stats: list[WorkloadStats]
) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        _progress_line(out, loop.time() - started, model, server, stats)


def _ms(value: int | None) -> str:
    return "-" if value is None else f"{value:,} ms"


def _table(out: TextIO, report: DemoReport) -> None:
    head = (
        f"  {'workload':<20}{'crit':>5}{'sent':>7}{'admitted':>10}{'rejected':>10}"
        f"{'wait p50':>11}{'wait p95':>11}{'total p50':>11}"
    )
    rows = [
        f"  {s.name:<20}{s.criticality:>5}{s.sent:>7}{s.admitted:>10}{s.rejected:>10}"
        f"{_ms(s.wait_p50_ms):>11}{_ms(s.wait_p95_ms):>11}{_ms(s.latency_p50_ms):>11}"
        for s in report.workloads
    ]
    rule = "  " + "-" * (len(head) - 2)
    out.write("\n".join(["", head, rule, *rows, ""]))
    failed = sum(s.failed for s in report.workloads)
    if failed:
        out.write(f"\n  {failed} requests failed (neither admitted nor rejected): see the logs.\n")
    out.write("\n")


def _explain(out: TextIO, report: DemoReport) -> None:
    ranked = sorted(report.workloads, key=lambda s: -s.criticality)
    top, bottom = ranked[0], ranked[-1]
    heaviest = ", the heaviest sender" if bottom.rate == max(s.rate for s in ranked) else ""
    rejected = sum(s.rejected for s in report.workloads)
    most = max(report.workloads, key=lambda s: s.rejected)
    sentences = [
        "wait = time an admitted request spent in the sidecar's queue before it went to the "
        "model; total = until its last streamed token.",
        f"The workloads offered more than the model's {report.slots} slots could serve, so "
        "requests queued, and each time a slot came free the workload-aware policy picked the "
        "queued request with the best score: high criticality raises it, a high request rate "
        "lowers it, a long average wait raises it.",
        f"So {top.name} (criticality {top.criticality}) waited {_ms(top.wait_p50_ms)} at the "
        f"median and {bottom.name} (criticality {bottom.criticality}{heaviest}) "
        f"{_ms(bottom.wait_p50_ms)}.",
    ]
    if rejected:
        share = "all" if most.rejected == rejected else f"{most.rejected} of the"
        sentences.append(
            f"The overload fell on {most.name}: {share} {rejected} rejected requests were its "
            f"own, still queued when their {TTL_S:g}s TTL ran out."
        )
    else:
        sentences.append(
            f"Nothing waited past the {TTL_S:g}s TTL, so nothing was rejected; a longer run "
            "shows the queue overflowing onto the background work."
        )
    sentences.append(
        "The score and its knobs are in README.md, 'How admission works' and 'Configuration'."
    )
    text = textwrap.fill(" ".join(sentences), width=96, initial_indent="  ", subsequent_indent="  ")
    out.write(text + "\n")
    out.flush()


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """Per-request access logs would drown the table; ``--log-level debug`` keeps them."""
    logger = logging.getLogger("sidecar")
    level = logger.level
    if not logger.isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


async def _drive(
    url: str, model: SimulatedModel, server: Server, seconds: float, out: TextIO
) -> list[WorkloadStats]:
    """Sends the traffic for ``seconds``, then waits for every request's answer (at most a TTL
    plus a completion later: no request stays queued longer than its TTL)."""
    stats = [WorkloadStats(w.name, w.criticality, w.rate) for w in WORKLOADS]
    rng = random.Random(SEED)
    loop = asyncio.get_running_loop()
    started = loop.time()
    requests: set[asyncio.Task[None]] = set()
    # Requests queue for seconds: no client-side limit on connections, and a timeout well past
    # the TTL that only a hung request would reach.
    timeout = aiohttp.ClientTimeout(total=TTL_S + 10 * SERVICE_S + 10)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=timeout
    ) as session:
        progress = asyncio.create_task(_progress(out, started, model, server, stats))
        try:
            async with asyncio.TaskGroup() as group:
                for workload, workload_stats in zip(WORKLOADS, stats, strict=True):
                    group.create_task(
                        _traffic(
                            session,
                            url,
                            workload,
                            workload_stats,
                            started + seconds,
                            random.Random(rng.random()),
                            requests,
                        )
                    )
            out.write("  traffic stopped; waiting for the last answers\n")
            out.flush()
            while requests:
                await asyncio.gather(*requests)
        finally:
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress
            for task in requests:
                task.cancel()
            await asyncio.gather(*requests, return_exceptions=True)
    _progress_line(out, loop.time() - started, model, server, stats)
    return stats


async def run_demo(
    seconds: float = 20.0, *, out: TextIO | None = None, utilization: bool = False
) -> DemoReport:
    """Runs the demo end to end on loopback, prints its table to ``out`` (stdout) and returns it.
    ``utilization``: the utilization detector against the simulated vLLM server's /metrics; the
    server then runs SLOTS requests at once and keeps the rest waiting, as a model server does."""
    out = sys.stdout if out is None else out
    with _quiet_logs():
        model = SimulatedModel(
            latency_s=FIRST_TOKEN_S,
            token_delay_s=TOKEN_DELAY_S,
            batch_slots=SLOTS if utilization else None,
        )
        upstream, upstream_port = await start_app(model.app(), HOST)
        try:
            port, admin_port = _free_ports(2)
            model_url = f"http://{HOST}:{upstream_port}"
            options = ServeOptions(
                config=demo_config(model_url if utilization else None),
                listen=(HOST, port),
                admin_listen=(HOST, admin_port),
                redis_url=None,  # the embedded store: nothing to install
                upstream=model_url,
                replica_id="demo",
            )
            server = Server(options)
            await server.start()
            _header(out, seconds, options)
            try:
                url = f"http://{HOST}:{port}/v1/chat/completions"
                stats = await _drive(url, model, server, seconds, out)
            finally:
                await server.shutdown()
        finally:
            await upstream.cleanup()
    report = DemoReport(seconds, SLOTS, stats, model.peak)
    _table(out, report)
    _explain(out, report)
    return report
