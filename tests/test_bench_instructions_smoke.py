"""The single-client halves of bench/engine_compare.py (Redis instructions per admission,
counted by valgrind's callgrind, and Redis CPU per admission with one client) run end to end on
this tree, so their code cannot rot."""

from __future__ import annotations

import math

import pytest

from bench.engine_compare import KINDS, ROOT, instructions_round, sequential_round


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
