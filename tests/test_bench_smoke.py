"""The dispatch-depth benchmark runs end to end on a small scale, so its code cannot rot."""

from __future__ import annotations

import math

import pytest

from bench.dispatch_depth import run


@pytest.mark.redis
async def test_dispatch_depth_benchmark_runs() -> None:
    rates = await run(depths=[10, 200], steps=50, rounds=1, redis_url=None)
    assert sorted(rates) == [10, 200]
    assert all(rate > 0 and math.isfinite(rate) for rate in rates.values())
