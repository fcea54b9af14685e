"""The chaos run's invariants, judged after the run from what the upstream and the clients saw.

Each check returns its figures and the violations it found (plain sentences with numbers). Time
is ``time.monotonic()`` of the one process that ran the upstream, the clients and the faults.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec

from bench.chaos_faults import Fault
from bench.chaos_load import ClientRecord
from bench.chaos_timeline import (
    UP_END,
    UP_START,
    Concurrency,
    Event,
    Intervals,
    State,
    Visitor,
    events,
    sweep,
)
from bench.recording_upstream import UpstreamRecord

BUSY_SHARE = 0.9  # mean busy slots under saturation must reach this share of maxConcurrency
# A slot idle while work waits: the release → dispatch → inbox wake-up → forward path takes
# milliseconds; these bounds leave room for a loaded two-core machine, no more.
GAP_P99_LIMIT_S = 0.25
GAP_MAX_LIMIT_S = 1.0
# A request answered this long after Redis answered again should not meet a dead connection.
LATE_503_S = 2.0
WAKE_BOUND_S = 1.0  # a woken replica's stale requests must end this soon after SIGCONT
# A request sent this long before SIGSTOP was surely read (and enqueued) by the replica.
ACCEPTED_BEFORE_S = 0.1
# Stretches between fault windows shorter than this are too noisy to judge on their own.
STRETCH_MIN_S = 5.0
# Redis's in-flight count exceeds the upstream's by the time a slot spends in the sidecar around
# each request (well under one slot on average when healthy); a whole slot more is a lost one.
HELD_IDLE_LIMIT = 1.0
RECOVERY_STEP_S = 0.05
RECOVERY_WINDOW_S = 1.0  # busy share is the mean over the trailing second
DIP_WITHIN_S = 2.0  # a fault whose busy share has not dipped this long after it ended did not hurt


@dataclass
class RunData:
    limit: int
    lease_s: float
    margin_s: float  # a fault window lasts from the fault to its end plus this
    measured: tuple[float, float]  # monotonic: after warmup until the load stopped
    upstream: Sequence[UpstreamRecord]
    clients: Sequence[ClientRecord]
    faults: Sequence[Fault]
    replicas: int
    now: float
    # (monotonic, in flight, queued) read from the pool's stats hash a few times a second
    pool_samples: Sequence[tuple[float, int, int]] = ()


class PauseFigures(msgspec.Struct):
    replica: int
    held: int  # in-flight slots it held right after SIGSTOP
    overshoot: int  # max upstream concurrency above the limit in its window
    overshoot_until_s: float | None  # the last instant over the limit, after SIGCONT
    stale: int  # its upstream requests that started before SIGSTOP and ran past its lease lapse
    stale_peak: int
    stale_end_after_cont_s: float | None  # when the last stale one ended, after SIGCONT
    # Requests it had accepted before SIGSTOP that reached the upstream after the lapse: either
    # re-queued and admitted again (fine) or forwarded on a reclaimed slot (then they overshoot).
    late_forwards: int
    late_forwards_end_after_cont_s: float | None


class FaultFigures(msgspec.Struct):
    kind: str
    label: str
    at_s: float  # after the load started
    took_s: float  # until the replica or Redis was back, or SIGCONT
    recovered_s: float | None  # fault → back at >= 90 % busy (0: it never dipped)
    first_admission_s: float | None = None  # redis: Redis back → first upstream start
    # From the end of its window to the next fault: mean upstream concurrency, and the median
    # in-flight count Redis reported (more in Redis than at the upstream: slots held idle).
    busy_after: float | None = None
    redis_inflight_after: float | None = None
    pause: PauseFigures | None = None


class Summary(msgspec.Struct):
    limit: int
    upstream_requests: int
    upstream_peak: int
    overshoot_outside_pauses: int  # max concurrency above the limit outside any pause window
    responses: dict[str, int]
    gap_count: int
    gap_p50_ms: float
    gap_p99_ms: float
    gap_max_ms: float
    clean_s: float  # measured time outside fault windows
    saturated_s: float  # of which something was waiting
    busy_mean: float  # mean busy slots over the saturated clean time
    faults: list[FaultFigures]
    drain_s: float | None = None  # load stopped → Redis shows 0 in flight, 0 queued
    refused: int = 0  # connections refused (a killed replica), retried on another
    # 503 store_unavailable answered while Redis had been up for LATE_503_S or longer
    late_store_unavailable: int = 0
    all_refused: int = 0  # requests every replica refused at once
    violations: list[str] = msgspec.field(default_factory=list)


@dataclass
class _Overshoot(Visitor):
    limit: int
    pauses: Sequence[Fault]
    worst_outside: int = 0
    first_outside: float | None = None
    in_pause: dict[int, int] = field(default_factory=dict)
    in_pause_until: dict[int, float] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    def on_stretch(self, t0: float, t1: float, state: State) -> None:
        excess = state.running - self.limit
        if excess <= 0:
            return
        for n, p in enumerate(self.pauses):
            if p.at <= t0 and t1 <= p.end + WAKE_BOUND_S:
                self.in_pause[n] = max(self.in_pause.get(n, 0), excess)
                self.in_pause_until[n] = t1
                others = state.running - state.per_replica[p.replica]
                if others > self.limit:
                    self.violations.append(
                        f"concurrency {state.running} > {self.limit} during the pause of "
                        f"r{p.replica}, and the other replicas alone ran {others}"
                    )
                if excess > p.held:
                    self.violations.append(
                        f"overshoot {excess} during the pause of r{p.replica} exceeds the "
                        f"{p.held} slots it held when paused"
                    )
                return
        if excess > self.worst_outside:
            self.worst_outside = excess
        if self.first_outside is None:
            self.first_outside = t0


@dataclass
class _Slots(Visitor):
    """Idle-slot gaps while work waited, and busy slots, outside fault windows."""

    limit: int
    clean: Intervals
    gaps: list[float] = field(default_factory=list)
    # Per clean interval: busy slot-seconds and seconds while something waited.
    busy_area: list[float] = field(default_factory=list)
    saturated: list[float] = field(default_factory=list)
    free: deque[float] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.free.extend([-math.inf] * self.limit)
        self.busy_area = [0.0] * len(self.clean.spans)
        self.saturated = [0.0] * len(self.clean.spans)

    def on_event(self, event: Event, before: State, after: State) -> None:
        if event.order == UP_END and after.running < self.limit:
            self.free.append(event.t)
        elif event.order == UP_START and before.running < self.limit and self.free:
            since = self.free.popleft()
            waiting_since = before.wait_since if before.wait_since is not None else event.t
            start = max(since, waiting_since)
            if self.clean.contains(start, event.t):
                self.gaps.append(event.t - start)

    def on_stretch(self, t0: float, t1: float, state: State) -> None:
        if state.waiting > 0:
            for i, inside in self.clean.pieces(t0, t1):
                self.saturated[i] += inside
                self.busy_area[i] += state.running * inside


@dataclass
class _Curve(Visitor):
    curve: Concurrency = field(default_factory=Concurrency)

    def on_event(self, event: Event, before: State, after: State) -> None:
        self.curve.add(event.t, after.running)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)), 1) - 1]


def response_counts(clients: Sequence[ClientRecord]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for c in clients:
        if c.kind == "response":
            label = f"{c.status} {c.outcome or '(no outcome header)'}"
            if c.reason and c.reason != c.outcome:
                label += f" / {c.reason}"
            counts[label] += 1
        else:
            counts[c.kind] += 1
    return dict(sorted(counts.items()))


def response_violations(
    clients: Sequence[ClientRecord], upstream: Sequence[UpstreamRecord]
) -> list[str]:
    out = []
    responses = [c for c in clients if c.kind == "response"]
    checks = [
        ("answered 500", [c for c in responses if c.status == 500]),
        (
            "answered 502 (the recording upstream never fails)",
            [c for c in responses if c.status == 502],
        ),
        ("answered without x-admission-outcome", [c for c in responses if not c.outcome]),
        ("answered 200 with a truncated body", [c for c in responses if not c.body_ok]),
        (
            "connection reset although their replica was not killed",
            [c for c in clients if c.kind == "reset_other"],
        ),
        ("never answered (cut after the drain)", [c for c in clients if c.kind == "unfinished"]),
    ]
    for what, bad in checks:
        if bad:
            sample = bad[0]
            out.append(
                f"{len(bad)} requests {what}, e.g. {sample.request_id} {sample.error}".strip()
            )
    seen = Counter(u.request_id for u in upstream)
    twice = [rid for rid, n in seen.items() if n > 1]
    if twice:
        out.append(f"{len(twice)} request ids reached the upstream more than once, e.g. {twice[0]}")
    lost = [c for c in responses if c.status == 200 and c.request_id not in seen]
    if lost:
        out.append(f"{len(lost)} requests answered 200 never reached the upstream")
    running = [u for u in upstream if u.end < 0]
    if running:
        out.append(f"{len(running)} upstream requests never ended")
    return out


def pause_figures(p: Fault, data: RunData, over: _Overshoot, n: int) -> PauseFigures:
    """The paused replica's requests that ran past its lease lapse, and those it had accepted
    before SIGSTOP that reached the upstream only after the lapse."""
    sent = {c.request_id: c.sent for c in data.clients}
    lapse = p.at + data.lease_s
    mine = [u for u in data.upstream if u.replica == p.replica]
    stale = [u for u in mine if u.start < p.at and (u.end < 0 or u.end > lapse)]
    late = [
        u
        for u in mine
        if u.start >= lapse and sent.get(u.request_id, math.inf) < p.at - ACCEPTED_BEFORE_S
    ]

    def end_after_cont(records: Sequence[UpstreamRecord]) -> float | None:
        ends = [u.end if u.end >= 0 else data.now for u in records]
        return round(max(ends) - p.end, 3) if ends else None

    marks = sorted([(u.start, 1) for u in stale] + [(u.end, -1) for u in stale])  # ends first
    peak = running = 0
    for _, delta in marks:
        running += delta
        peak = max(peak, running)
    until = over.in_pause_until.get(n)
    return PauseFigures(
        replica=p.replica,
        held=p.held,
        overshoot=over.in_pause.get(n, 0),
        overshoot_until_s=None if until is None else round(until - p.end, 3),
        stale=len(stale),
        stale_peak=peak,
        stale_end_after_cont_s=end_after_cont(stale),
        late_forwards=len(late),
        late_forwards_end_after_cont_s=end_after_cont(late),
    )


def recovery(f: Fault, curve: Concurrency, limit: int, until: float) -> float | None:
    """Fault → the trailing-second mean busy is back at >= 90 % (0 when it never dipped)."""
    target = BUSY_SHARE * limit
    t, dipped = f.at, False
    while t <= until:
        busy = curve.mean(t - RECOVERY_WINDOW_S, t)
        if not dipped and busy < target:
            dipped = True
        elif dipped and busy >= target:
            return round(t - f.at, 2)
        if not dipped and t > f.end + DIP_WITHIN_S:
            return 0.0
        t += RECOVERY_STEP_S
    return None


def judge(data: RunData, load_start: float) -> Summary:
    done = [f for f in data.faults if f.at >= 0 and f.end >= 0]
    pauses = [f for f in done if f.kind == "pause"]
    clean = Intervals(*data.measured, [(f.at, f.end + data.margin_s) for f in done])
    over = _Overshoot(data.limit, pauses)
    slots = _Slots(data.limit, clean)
    curve = _Curve()
    sweep(events(data.upstream, data.clients, data.now), data.replicas, [over, slots, curve])
    violations = list(dict.fromkeys(over.violations))
    if over.first_outside is not None:
        violations.append(
            f"upstream concurrency {data.limit + over.worst_outside} > limit {data.limit} outside "
            f"any pause window, first at +{over.first_outside - load_start:.2f}s"
        )
    violations += response_violations(data.clients, data.upstream)
    figures = []
    for n, f in enumerate(done):
        nxt = done[n + 1].at if n + 1 < len(done) else data.measured[1]
        fig = FaultFigures(
            kind=f.kind,
            label=f.label,
            at_s=round(f.at - load_start, 2),
            took_s=round(f.end - f.at, 2),
            recovered_s=recovery(f, curve.curve, data.limit, nxt),
        )
        settled = f.end + data.margin_s
        if nxt > settled:
            fig.busy_after = round(curve.curve.mean(settled, nxt), 2)
            inflight = [c for t, c, _ in data.pool_samples if settled <= t <= nxt]
            fig.redis_inflight_after = statistics.median(inflight) if inflight else None
        if f.kind == "redis":
            later = [u.start for u in data.upstream if u.start >= f.end]
            fig.first_admission_s = round(min(later) - f.end, 3) if later else None
            if not later:
                violations.append(f"nothing was admitted after the Redis restart at +{fig.at_s}s")
        if f.kind == "pause":
            fig.pause = pause_figures(f, data, over, pauses.index(f))
            violations += _stale_violations(fig.pause)
        figures.append(fig)
    gaps = slots.gaps
    summary = Summary(
        limit=data.limit,
        upstream_requests=len(data.upstream),
        upstream_peak=max(curve.curve.values, default=0),
        overshoot_outside_pauses=over.worst_outside,
        responses=response_counts(data.clients),
        gap_count=len(gaps),
        gap_p50_ms=round(percentile(gaps, 0.5) * 1000, 1),
        gap_p99_ms=round(percentile(gaps, 0.99) * 1000, 1),
        gap_max_ms=round(max(gaps, default=0.0) * 1000, 1),
        clean_s=round(clean.length, 2),
        saturated_s=round(sum(slots.saturated), 2),
        busy_mean=round(sum(slots.busy_area) / sum(slots.saturated), 3)
        if any(slots.saturated)
        else 0.0,
        faults=figures,
    )
    violations += _slot_violations(summary)
    restarts = [(f.at, f.end + LATE_503_S) for f in done if f.kind == "redis"]
    summary.late_store_unavailable = sum(
        1
        for c in data.clients
        if c.status == 503
        and c.reason == "store_unavailable"
        and not any(a <= c.done <= b for a, b in restarts)
    )
    violations += _stretch_violations(clean, slots, data, load_start)
    summary.violations = violations
    return summary


def _stale_violations(p: PauseFigures) -> list[str]:
    out = []
    if p.stale_peak > p.held:
        out.append(
            f"r{p.replica} ran {p.stale_peak} stale requests at once after its lease lapsed, "
            f"more than the {p.held} slots it held when paused"
        )
    if p.stale_end_after_cont_s is not None and p.stale_end_after_cont_s > WAKE_BOUND_S:
        out.append(
            f"r{p.replica}'s stale requests ran until {p.stale_end_after_cont_s:.2f}s after "
            f"SIGCONT (bound {WAKE_BOUND_S:.0f}s; {p.stale} stale requests)"
        )
    return out


def _stretch_violations(
    clean: Intervals, slots: _Slots, data: RunData, load_start: float
) -> list[str]:
    """Slots held in Redis with no work behind them, per stretch between fault windows. Such a
    slot lost for good hides in the run's busy mean when a later kill of its owner reclaims it."""
    out = []
    for (a, b), sat, area in zip(clean.spans, slots.saturated, slots.busy_area, strict=True):
        inflight = [c for t, c, _ in data.pool_samples if a <= t <= b]
        if b - a < STRETCH_MIN_S or sat < (b - a) / 2 or not inflight:
            continue
        redis, busy = statistics.median(inflight), area / sat
        if redis - busy >= HELD_IDLE_LIMIT:
            out.append(
                f"slots held in Redis with no work at the upstream from +{a - load_start:.1f}s "
                f"to +{b - load_start:.1f}s: Redis counted {redis:g} in flight (median), the "
                f"upstream ran {busy:.2f} on average while work waited"
            )
    return out


def _slot_violations(s: Summary) -> list[str]:
    out = []
    if s.gap_count and (
        s.gap_p99_ms > GAP_P99_LIMIT_S * 1000 or s.gap_max_ms > GAP_MAX_LIMIT_S * 1000
    ):
        out.append(
            f"slots idle while work waited: p99 {s.gap_p99_ms} ms, max {s.gap_max_ms} ms "
            f"(bounds {GAP_P99_LIMIT_S * 1000:.0f} / {GAP_MAX_LIMIT_S * 1000:.0f} ms)"
        )
    if s.saturated_s <= 0:
        out.append("the load never saturated the pool outside fault windows: nothing was judged")
    elif s.busy_mean < BUSY_SHARE * s.limit:
        out.append(
            f"mean busy slots under saturation {s.busy_mean:.2f} < {BUSY_SHARE:.0%} of {s.limit}"
        )
    return out
