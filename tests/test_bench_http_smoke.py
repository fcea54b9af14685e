"""The HTTP benchmark runs end to end for a moment, so its processes and parsing cannot rot."""

from __future__ import annotations

import math
import re

import pytest

from bench.http_bench import run

NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")


def figures(text: str) -> list[float]:
    return [float(n.replace(",", "")) for n in NUMBER.findall(text)]


@pytest.mark.redis
@pytest.mark.timeout(60)
async def test_http_benchmark_runs() -> None:
    rows = await run(quick=True)
    assert [row.number for row in rows] == [1, 2, 3, 5]
    for row in rows:
        ours = figures(row.ours)
        assert ours, row
        assert all(f > 0 and math.isfinite(f) for f in ours), row
        assert row.passed is not None, row
        if row.baseline != "-":
            base = figures(row.baseline)
            assert base and all(f > 0 and math.isfinite(f) for f in base), row
    # The ratios are positive numbers; the latency differences may be of either sign.
    for row in rows[0], rows[2]:
        (ratio,) = figures(row.result)
        assert ratio > 0 and math.isfinite(ratio), row
