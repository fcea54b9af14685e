"""The chaos run's summary as a table for people (``--json`` prints the Summary itself)."""

from __future__ import annotations

from bench.chaos_check import (
    BUSY_SHARE,
    GAP_MAX_LIMIT_S,
    GAP_P99_LIMIT_S,
    LATE_503_S,
    WAKE_BOUND_S,
    FaultFigures,
    Summary,
)


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}s"


def _since_cont(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}s after SIGCONT" if value >= 0 else f"{-value:.2f}s before SIGCONT"


def _fault_line(f: FaultFigures) -> str:
    line = f"  +{f.at_s:6.2f}s  {f.label:<14} took {f.took_s:5.2f}s  "
    line += f">=90% busy again after {_seconds(f.recovered_s)}"
    if f.first_admission_s is not None or f.kind == "redis":
        line += f"; first admission {_seconds(f.first_admission_s)} after Redis was back"
    if f.busy_after is not None:
        line += (
            f"\n             then until the next fault: upstream busy {f.busy_after:.2f}, "
            f"Redis in flight {f.redis_inflight_after} (median)"
        )
    if f.pause is not None:
        p = f.pause
        over = (
            f"overshoot {p.overshoot} (bound {p.held}), over the limit until "
            f"{_since_cont(p.overshoot_until_s)} (bound {WAKE_BOUND_S:.0f}s after)"
            if p.overshoot
            else "no overshoot"
        )
        line += (
            f"\n             held {p.held} slots when paused; {over}"
            f"\n             {p.stale} of its requests ran past its lease lapse (peak "
            f"{p.stale_peak}), the last until {_since_cont(p.stale_end_after_cont_s)}; "
            f"{p.late_forwards} accepted before SIGSTOP reached the upstream after the lapse, "
            f"the last until {_since_cont(p.late_forwards_end_after_cont_s)}"
        )
    return line


def render(s: Summary, replicas: int, lease_s: float, seed: int) -> str:
    lines = [
        f"chaos run: {replicas} replicas, maxConcurrency {s.limit}, leaseTimeout {lease_s:g}s, "
        f"seed {seed}",
        "",
        "faults (time after the load started):",
        *(_fault_line(f) for f in s.faults),
        "",
        "client results (status outcome [/ reason], or what happened instead):",
        *(f"  {n:>6}  {label}" for label, n in s.responses.items()),
        f"  {s.refused:>6}  connection refused, retried on another replica",
        f"  {s.all_refused:>6}  refused by every replica",
        f"  {s.late_store_unavailable:>6}  of the 503 store_unavailable came while Redis had been "
        f"up for over {LATE_503_S:g}s (not judged)",
        "",
        f"upstream: {s.upstream_requests} requests, peak concurrency {s.upstream_peak} "
        f"(limit {s.limit}; outside pause windows over by {s.overshoot_outside_pauses})",
        f"idle slot while work waited (outside fault windows): {s.gap_count} gaps, "
        f"p50 {s.gap_p50_ms} ms, p99 {s.gap_p99_ms} ms, max {s.gap_max_ms} ms "
        f"(bounds p99 {GAP_P99_LIMIT_S * 1000:.0f}, max {GAP_MAX_LIMIT_S * 1000:.0f} ms)",
        f"busy slots under saturation: mean {s.busy_mean:.2f} of {s.limit} "
        f"({s.busy_mean / s.limit:.0%}, bound {BUSY_SHARE:.0%}) over {s.saturated_s:.1f}s "
        f"saturated of {s.clean_s:.1f}s outside fault windows",
        f"drain: Redis in flight 0, queued 0 after {_seconds(s.drain_s)} (bound {lease_s + 2:g}s)",
        "",
        f"violations: {len(s.violations)}",
        *(f"  - {v}" for v in s.violations),
    ]
    return "\n".join(lines)
