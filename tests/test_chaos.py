"""The chaos run (bench/chaos.py): its judge on hand-made timelines, and the short preset, real."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from bench.chaos_check import RunData, Summary, judge
from bench.chaos_faults import Fault
from bench.chaos_load import ClientRecord
from bench.recording_upstream import UpstreamRecord

ROOT = Path(__file__).resolve().parents[1]
SHORT_RUN_TIMEOUT_S = 150  # the preset takes about 75 s; this leaves room for a slowed machine


def up(rid: str, start: float, end: float) -> UpstreamRecord:
    return UpstreamRecord(rid, int(rid.split(".")[0][1:]), start, end)


def client(rid: str, sent: float, done: float) -> ClientRecord:
    return ClientRecord(rid, int(rid.split(".")[0][1:]), sent, done, "response", 200, "dispatched")


def run_data(
    upstream: list[UpstreamRecord], clients: list[ClientRecord], faults: list[Fault], limit: int
) -> RunData:
    return RunData(
        limit=limit,
        lease_s=3.0,
        margin_s=5.0,
        measured=(0.0, 100.0),
        upstream=upstream,
        clients=clients,
        faults=faults,
        replicas=2,
        now=100.0,
    )


def test_overshoot_outside_a_pause_window_is_a_violation() -> None:
    ups = [up("r0.a", 10.0, 12.0), up("r1.b", 10.5, 11.5)]
    summary = judge(run_data(ups, [], [], limit=1), load_start=0.0)
    assert summary.overshoot_outside_pauses == 1
    assert any("outside any pause window, first at +10.50s" in v for v in summary.violations)


def test_paused_replicas_stale_request_is_judged_against_what_it_held() -> None:
    # r1 paused at 20 holding 1 slot, lease 3 s: its request runs on past the lapse (23) and
    # ends 0.5 s after SIGCONT (24.5) while r0 ran its own slot: overshoot 1, within the bound.
    pause = Fault("pause", 1, 20.0, at=20.0, end=24.5, held=1)
    ups = [up("r1.stale", 19.0, 25.0), up("r0.new", 23.2, 26.0)]
    clients = [client("r1.stale", 18.9, 25.1), client("r0.new", 23.1, 26.1)]
    summary = judge(run_data(ups, clients, [pause], limit=1), load_start=0.0)
    assert summary.overshoot_outside_pauses == 0
    (fault,) = summary.faults
    assert fault.pause is not None
    assert (fault.pause.overshoot, fault.pause.stale, fault.pause.stale_peak) == (1, 1, 1)
    assert fault.pause.stale_end_after_cont_s == 0.5
    assert fault.pause.overshoot_until_s == 0.5
    assert not [v for v in summary.violations if "r1" in v or "limit" in v]


def test_stale_requests_past_the_wake_bound_are_a_violation() -> None:
    pause = Fault("pause", 1, 20.0, at=20.0, end=24.5, held=1)
    ups = [up("r1.stale", 19.0, 26.0)]
    summary = judge(run_data(ups, [client("r1.stale", 18.9, 26.1)], [pause], 1), 0.0)
    assert any("1.50s after SIGCONT" in v for v in summary.violations)


def test_idle_slot_while_work_waits_is_measured_and_busy_share_judged() -> None:
    # One slot; the second request waits from 0.5 while the slot is free from 2.0 to 2.4.
    ups = [up("r0.a", 0.1, 2.0), up("r0.b", 2.4, 4.0)]
    clients = [client("r0.a", 0.0, 2.01), client("r0.b", 0.5, 4.01)]
    data = run_data(ups, clients, [], limit=1)
    data.measured = (0.0, 4.0)
    summary = judge(data, load_start=0.0)
    assert summary.gap_count == 2  # the first start took a slot free since the beginning
    assert summary.gap_max_ms == 400.0
    # Something waited during [0, 0.1] (slot free) and [0.5, 2.4] (busy until 2.0).
    assert summary.saturated_s == 2.0
    assert summary.busy_mean == 0.75
    assert any("slots idle while work waited" in v for v in summary.violations)
    assert any("mean busy slots under saturation" in v for v in summary.violations)


def test_a_slot_held_in_redis_with_no_work_is_a_violation_even_when_the_run_mean_passes() -> None:
    # Two slots busy until the kill at +170; from then on the second one does no work while
    # Redis goes on counting it.
    kill = Fault("kill", 0, 170.0, at=170.0, end=170.0)
    ups = [up("r0.a", 0.0, 200.0), up("r0.b", 0.0, 173.0)]
    waiting = ClientRecord("r0.w", 0, 0.0, 200.0, "gave_up")
    data = run_data(ups, [waiting], [kill], limit=2)
    data.measured = (0.0, 200.0)
    data.pool_samples = [(t / 4, 2, 1) for t in range(800)]
    summary = judge(data, load_start=0.0)
    assert summary.busy_mean == pytest.approx(365 / 195, abs=1e-3)  # 94 %: the mean passes
    assert summary.violations == [
        "slots held in Redis with no work at the upstream from +175.0s to +200.0s: Redis counted "
        "2 in flight (median), the upstream ran 1.00 on average while work waited"
    ]


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.timeout(SHORT_RUN_TIMEOUT_S + 10)
def test_short_chaos_run_holds_every_invariant() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.chaos", "--short", "--json"],
        cwd=ROOT,
        capture_output=True,
        timeout=SHORT_RUN_TIMEOUT_S,
        check=False,
    )
    assert proc.stdout, proc.stderr.decode()[-2000:]
    summary = msgspec.json.decode(proc.stdout.splitlines()[-1], type=Summary)
    assert summary.violations == []
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert summary.upstream_requests > 0
    assert [f.kind for f in summary.faults].count("kill") == 2
