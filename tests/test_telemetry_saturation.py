"""llm-d's utilization formula, its parameters and defaults, and the staleness policies."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.telemetry.saturation import (
    SATURATION_KEYS,
    PoolSaturation,
    Sample,
    UtilizationParameters,
    endpoint_score,
    pool_saturation,
)

DEFAULTS = UtilizationParameters()
NOW = 1000.0


def fresh(waiting: float, kv: float | None = 0.0, age: float = 0.0) -> Sample:
    return Sample(waiting, kv, NOW - age)


def test_defaults_are_llm_ds() -> None:
    assert DEFAULTS.queue_depth_threshold == 5
    assert DEFAULTS.kv_cache_util_threshold == 0.8
    assert DEFAULTS.metrics_staleness_threshold == 0.2
    assert DEFAULTS.headroom == 0.0
    assert DEFAULTS.staleness_policy == "failClosed"
    assert DEFAULTS.hold_bound == 1.0
    assert UtilizationParameters.from_parameters({}) == DEFAULTS


def test_parameters_in_the_configs_own_names() -> None:
    params = UtilizationParameters.from_parameters(
        {
            "queueDepthThreshold": 8,
            "kvCacheUtilThreshold": 0.9,
            "metricsStalenessThreshold": "500ms",
            "headroom": 0.2,
            "stalenessPolicy": "holdLast",
            "holdLastFor": "2s",
            "endpoints": ["http://ignored:1"],  # not this module's key: ignored here
        }
    )
    assert params == UtilizationParameters(8, 0.9, 0.5, 0.2, "holdLast", 2.0)
    assert set(SATURATION_KEYS) == {
        "queueDepthThreshold",
        "kvCacheUtilThreshold",
        "metricsStalenessThreshold",
        "headroom",
        "stalenessPolicy",
        "holdLastFor",
    }


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"queueDepthThreshold": 0}, "queueDepthThreshold"),
        ({"queueDepthThreshold": 2.5}, "queueDepthThreshold"),
        ({"queueDepthThreshold": True}, "queueDepthThreshold"),
        ({"kvCacheUtilThreshold": 0}, "kvCacheUtilThreshold"),
        ({"kvCacheUtilThreshold": 1.5}, "kvCacheUtilThreshold"),
        ({"kvCacheUtilThreshold": "0.8"}, "kvCacheUtilThreshold"),
        ({"metricsStalenessThreshold": "0s"}, "metricsStalenessThreshold"),
        ({"metricsStalenessThreshold": "soon"}, "metricsStalenessThreshold"),
        ({"headroom": -0.1}, "headroom"),
        ({"stalenessPolicy": "failOpen"}, "stalenessPolicy"),
        ({"holdLastFor": "100ms"}, "holdLastFor"),  # shorter than the staleness threshold
    ],
)
def test_bad_parameters_name_their_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=f"^{key}:"):
        UtilizationParameters.from_parameters(raw)


def test_endpoint_score_is_the_most_constrained_resource() -> None:
    assert endpoint_score(fresh(10, 0.1), DEFAULTS) == 2.0  # queue: 10 / 5
    assert endpoint_score(fresh(1, 0.6), DEFAULTS) == pytest.approx(0.75)  # KV: 0.6 / 0.8
    assert endpoint_score(fresh(0, 0.0), DEFAULTS) == 0.0
    # Not clamped: above 1.0 says by how much the endpoint is oversubscribed.
    assert endpoint_score(fresh(0, 1.0), DEFAULTS) == 1.25


def test_without_a_kv_gauge_the_queue_alone_scores() -> None:
    assert endpoint_score(fresh(4, None), DEFAULTS) == pytest.approx(0.8)


def test_pool_saturation_is_the_unweighted_average() -> None:
    got = pool_saturation([fresh(10), fresh(0, 0.4), fresh(0)], NOW, DEFAULTS)
    assert (got.endpoints, got.stale, got.held) == (3, 0, 0)
    assert got.saturation == pytest.approx((2.0 + 0.5 + 0.0) / 3)


def test_waiting_at_the_threshold_saturates() -> None:
    # llm-d's usage limit gates dispatch at saturation >= 1.0.
    assert pool_saturation([fresh(5)], NOW, DEFAULTS).saturation == 1.0
    assert pool_saturation([fresh(4)], NOW, DEFAULTS).saturation < 1.0


def test_an_empty_pool_reads_saturated_with_no_stale_endpoint() -> None:
    assert pool_saturation([], NOW, DEFAULTS) == PoolSaturation(1.0, 0, 0, 0)


def test_missing_metrics_fail_closed_at_exactly_one() -> None:
    got = pool_saturation([None, fresh(0)], NOW, DEFAULTS)
    assert got == PoolSaturation(0.5, 2, 1, 0)
    assert pool_saturation([None], NOW, DEFAULTS) == PoolSaturation(1.0, 1, 1, 0)


def test_stale_metrics_fail_closed_whatever_they_said() -> None:
    # An idle endpoint seen 201 ms ago scores 1.0, not 0.0.
    assert pool_saturation([fresh(0, age=0.201)], NOW, DEFAULTS) == PoolSaturation(1.0, 1, 1, 0)
    # One seen exactly a threshold ago is fresh (llm-d: stale when age > threshold); 0.25 s, as
    # binary floats hold it exactly.
    quarter = UtilizationParameters(metrics_staleness_threshold=0.25)
    assert pool_saturation([fresh(0, age=0.25)], NOW, quarter) == PoolSaturation(0.0, 1, 0, 0)
    # A stale overloaded endpoint scores 1.0 too: stale reads exactly 1.0, overload above it.
    assert pool_saturation([fresh(20, age=5)], NOW, DEFAULTS).saturation == 1.0


def test_hold_last_scores_a_stale_endpoint_from_its_last_sample_within_the_bound() -> None:
    hold = UtilizationParameters(staleness_policy="holdLast", hold_last_for=1.0)
    held = pool_saturation([fresh(0, age=0.5), fresh(10)], NOW, hold)
    # Held, so it scores its last value (0.0), and it still counts as stale.
    assert held == PoolSaturation(1.0, 2, 1, 1)
    assert pool_saturation([fresh(1, age=1.0)], NOW, hold) == PoolSaturation(0.2, 1, 1, 1)


def test_hold_last_fails_closed_past_the_bound_and_without_a_sample() -> None:
    hold = UtilizationParameters(staleness_policy="holdLast", hold_last_for=1.0)
    assert pool_saturation([fresh(0, age=1.001)], NOW, hold) == PoolSaturation(1.0, 1, 1, 0)
    assert pool_saturation([None], NOW, hold) == PoolSaturation(1.0, 1, 1, 0)


def test_hold_last_bound_defaults_to_five_staleness_thresholds() -> None:
    hold = UtilizationParameters(metrics_staleness_threshold=0.5, staleness_policy="holdLast")
    assert hold.hold_bound == 2.5
    assert pool_saturation([fresh(0, age=2.4)], NOW, hold).held == 1
    assert pool_saturation([fresh(0, age=2.6)], NOW, hold).held == 0


def test_fail_closed_ignores_the_hold_bound() -> None:
    params = UtilizationParameters(hold_last_for=10.0)
    assert pool_saturation([fresh(0, age=0.5)], NOW, params) == PoolSaturation(1.0, 1, 1, 0)
