"""``admission-sidecar status``: a pool's live state, as a table or JSON."""

from __future__ import annotations

import sys

import msgspec

from sidecar.config import Config
from sidecar.state import PoolState, read_state
from sidecar.store import PoolStore
from sidecar.store.connect import connect


async def show_status(url: str, pool: str, config: Config, *, as_json: bool = False) -> None:
    config = msgspec.structs.replace(config, pool=pool)
    client, inbox = connect(url, timeout_s=max(config.redis.timeout, 2.0))
    try:
        snapshot = await read_state(PoolStore(client, config, "status", inbox_client=inbox))
    finally:
        await client.aclose()
        await inbox.aclose()
    if as_json:
        sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(snapshot)) + b"\n")
    else:
        print(render(snapshot))


def render(s: PoolState) -> str:
    lines = [
        f"pool {s.pool}: in flight {s.inflight}/{s.max_concurrency} "
        f"(saturation {s.saturation:.0%}), queued {s.queued} ({s.queued_bytes} bytes), "
        f"anonymous active {s.anonymous_active}",
        "",
        "bands (highest priority first):",
    ]
    if not s.bands:
        lines.append("  (nothing queued)")
    for b in s.bands:
        lines.append(
            f"  priority {b.priority:>5}: {b.queued} queued, {b.queued_bytes} bytes "
            f"[{b.fairness}, {b.ordering}]"
        )
        for f in b.flows:
            lines.append(f"    flow {f.flow}: {f.queued} queued")
        for lane in b.lanes[:20]:
            score = (
                f"score {lane.score:+.4f}" if lane.score is not None else f"key {lane.rank_key:.0f}"
            )
            who = (
                f"{lane.workload_id or '(anonymous)'} c{lane.criticality}"
                if lane.criticality
                else ""
            )
            lines.append(f"    lane {lane.flow} {who}: head {lane.head_item}, {score}")
    lines += ["", "workloads (most recently active first):"]
    if not s.workloads:
        lines.append("  (none tracked)")
    lines.append(
        f"  {'workload':<24} {'rate/s':>8} {'avg wait s':>10} {'active':>7} {'score@c3':>9}"
    )
    for w in s.workloads:
        score = f"{w.score_at_criticality_3:+.4f}" if w.score_at_criticality_3 is not None else "-"
        lines.append(
            f"  {w.workload_id:<24} {w.request_rate:>8.3f} {w.avg_wait_s:>10.3f} "
            f"{w.active:>7} {score:>9}"
        )
    lines += ["", "replicas:"]
    for r in s.replicas:
        lines.append(f"  {r.replica_id}: lease {r.lease_left_ms} ms left, owns {r.owned} items")
    if not s.replicas:
        lines.append("  (none)")
    return "\n".join(lines)
