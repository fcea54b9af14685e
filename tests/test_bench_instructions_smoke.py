"""The single-client halves of bench/engine_compare.py (Redis instructions per admission,
counted by valgrind's callgrind, and Redis CPU per admission with one client, whole runs or
engines taking turns) run end to end on this tree, so their code cannot rot."""

from __future__ import annotations

import math

import pytest

from bench.engine_compare import (
    KINDS,
    ROOT,
    instructions_round,
    interleaved_run,
    sequential_round,
)


@pytest.mark.redis
@pytest.mark.timeout(300)
def test_instruction_counts_are_positive_and_batching_amortizes_the_call() -> None:
    counts = instructions_round(ROOT, 1)
    assert sorted(counts) == sorted(KINDS)
    assert all(math.isfinite(n) and n > 0 for n in counts.values()), counts
    # One call for 64 admissions costs less per admission than two calls for one.
    assert counts["fast-batch"] < counts["fast"]
    assert counts["queued-batch"] < counts["queued"]


@pytest.mark.redis
@pytest.mark.timeout(300)
def test_sequential_cpu_is_measured_for_every_kind() -> None:
    figures = sequential_round(ROOT, 2)
    assert sorted(figures) == sorted(KINDS)
    assert all(math.isfinite(us) and us > 0 for us in figures.values()), figures


@pytest.mark.redis
@pytest.mark.timeout(300)
def test_interleaved_cpu_takes_turns_and_measures_both_engines() -> None:
    # This tree against itself: two children, each with its own redis-server and pools.
    run = interleaved_run({"old": ROOT, "new": ROOT}, "queued", blocks=3, steps=1)
    assert len(run.block_ratios) == 3
    assert all(math.isfinite(us) and us > 0 for us in run.us.values()), run.us
    assert math.isfinite(run.ratio) and run.ratio > 0
