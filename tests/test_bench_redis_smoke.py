"""The Redis cost benchmark (rows 6-8) runs end to end on a small scale, so its code cannot rot."""

from __future__ import annotations

import math
import re

import pytest

from bench.redis_bench import run

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def figures(text: str) -> list[float]:
    return [float(m.group().replace(",", "")) for m in NUMBER.finditer(text)]


@pytest.mark.redis
@pytest.mark.timeout(60)
async def test_redis_benchmark_rows_have_positive_finite_figures() -> None:
    rows = await run(quick=True)
    assert sorted(r.number for r in rows) == [6, 7, 8]
    for row in rows:
        numbers = figures(row.ours) + figures(row.result)
        assert numbers, row
        assert all(math.isfinite(x) and x > 0 for x in numbers), row
    by_number = {r.number: r for r in rows}
    assert by_number[6].passed is not None and by_number[7].passed is not None
    assert by_number[8].passed is None  # reported, not judged
    # The fast path is one script call each way, whatever else changes.
    assert by_number[7].result.startswith("2 and ")
