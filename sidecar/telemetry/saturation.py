"""The utilization detector's formula: pool saturation from the endpoints' latest samples.

As llm-d computes it (llm-d/llm-d-router, pkg/epp/framework/plugins/flowcontrol/
saturationdetector/utilization/detector.go ``Saturation`` and config.go; README.md there):

    endpoint score  = max(waiting / queueDepthThreshold, kvUsage / kvCacheUtilThreshold)
    pool saturation = the unweighted average of the endpoint scores

Dispatch stops while saturation >= 1.0 (llm-d's default usage limit; pkg/epp/flowcontrol/
controller/internal/processor.go gates on ``saturation >= usageLimit``). The value is not clamped:
above 1.0 it says by how much the pool is oversubscribed.

Matching llm-d exactly:

- an endpoint whose metrics are missing, or older than ``metricsStalenessThreshold`` (strictly:
  ``age > threshold``), scores **exactly 1.0** (fail closed) and counts as stale; llm-d's
  ``flow_control_stale_endpoints`` gauge reports that count. A stall from stale metrics therefore
  reads exactly 1.0 while real overload usually reads above it;
- an empty pool (no endpoints) reads 1.0 with 0 stale endpoints;
- ``headroom`` does not enter the formula. In llm-d it relaxes the per-endpoint routing filter
  (``threshold * (1 + headroom)``); here it is carried for the dispatch side, which holds the
  requests dispatched since the last sample against it.

Our additions: a dialect without a KV-cache gauge (TGI) scores ``waiting / queueDepthThreshold``
alone; and ``stalenessPolicy: holdLast``, which llm-d's README names as a possible later option
and its users ask for: a stale endpoint keeps scoring from its last good sample while that sample
is at most ``holdLastFor`` old, then fails closed like ``failClosed`` does. A held endpoint still
counts as stale (the gauge says the data is old) and also as held.

Times are seconds on one monotonic clock, the scraper's: the sample times and ``now`` must come
from the same clock (every endpoint is scraped by the same process).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from sidecar.units import parse_duration

__all__ = [
    "SATURATION_KEYS",
    "PoolSaturation",
    "Sample",
    "StalenessPolicy",
    "UtilizationParameters",
    "endpoint_score",
    "pool_saturation",
]

StalenessPolicy = Literal["failClosed", "holdLast"]
STALENESS_POLICIES: tuple[StalenessPolicy, ...] = ("failClosed", "holdLast")
# The score of an endpoint the detector cannot see: saturated, exactly (as llm-d scores it).
FAIL_CLOSED_SCORE = 1.0
# holdLastFor when unset, in multiples of metricsStalenessThreshold: a few missed scrapes' worth.
HOLD_LAST_FACTOR = 5.0


@dataclass(frozen=True, slots=True)
class Sample:
    """One good scrape of one endpoint."""

    waiting: float
    # None: the dialect has no KV-cache gauge (TGI).
    kv_usage: float | None
    # When the answer arrived, seconds on the scraper's monotonic clock.
    at: float


class PoolSaturation(msgspec.Struct, frozen=True):
    """The pool's saturation at one instant, with what it was computed from."""

    saturation: float
    endpoints: int
    # Endpoints with missing metrics or metrics older than metricsStalenessThreshold (held or not).
    stale: int
    # Of the stale ones, those scored from their last good sample (stalenessPolicy holdLast).
    held: int = 0


@dataclass(frozen=True, slots=True)
class UtilizationParameters:
    """The detector's parameters, llm-d's defaults; validated as llm-d's config.go does."""

    # Waiting requests at which one endpoint counts as full ("ideal" queue depth). > 0.
    queue_depth_threshold: int = 5
    # KV-cache fill (fraction) at which one endpoint counts as full. In (0, 1].
    kv_cache_util_threshold: float = 0.8
    # Seconds after which an endpoint's sample is stale. > 0. llm-d: "200ms".
    metrics_staleness_threshold: float = 0.2
    # Burst allowance above the thresholds, a fraction (0.2 = 20%). >= 0. Not in the formula.
    headroom: float = 0.0
    staleness_policy: StalenessPolicy = "failClosed"
    # holdLast: the oldest a held sample may be, seconds; >= metricsStalenessThreshold.
    # None: HOLD_LAST_FACTOR x metricsStalenessThreshold (1 s with the defaults).
    hold_last_for: float | None = None

    def __post_init__(self) -> None:
        if (
            isinstance(self.queue_depth_threshold, bool)
            or not isinstance(self.queue_depth_threshold, int)
            or self.queue_depth_threshold <= 0
        ):
            raise ValueError("queueDepthThreshold: must be an integer > 0")
        if not 0.0 < self.kv_cache_util_threshold <= 1.0:
            raise ValueError("kvCacheUtilThreshold: must be in (0.0, 1.0]")
        if not self.metrics_staleness_threshold > 0:
            raise ValueError("metricsStalenessThreshold: must be > 0")
        if not self.headroom >= 0.0:
            raise ValueError("headroom: must be >= 0.0")
        if self.staleness_policy not in STALENESS_POLICIES:
            raise ValueError(f"stalenessPolicy: must be one of {', '.join(STALENESS_POLICIES)}")
        if self.hold_last_for is not None and not (
            self.hold_last_for >= self.metrics_staleness_threshold
        ):
            raise ValueError("holdLastFor: must be >= metricsStalenessThreshold")

    @property
    def hold_bound(self) -> float:
        """The oldest sample holdLast scores from, seconds."""
        if self.hold_last_for is None:
            return HOLD_LAST_FACTOR * self.metrics_staleness_threshold
        return self.hold_last_for

    @classmethod
    def from_parameters(cls, params: Mapping[str, Any]) -> UtilizationParameters:
        """From ``saturationDetector.parameters`` (other keys are ignored here); ValueError names
        the offending key."""
        kwargs: dict[str, Any] = {}
        for key, field, convert in _CONVERSIONS:
            if key in params:
                try:
                    kwargs[field] = convert(params[key])
                except ValueError as exc:
                    raise ValueError(f"{key}: {exc}") from None
        return cls(**kwargs)


def _integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer, got {value!r}")
    return value


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number, got {value!r}")
    return float(value)


def _policy(value: object) -> StalenessPolicy:
    for policy in STALENESS_POLICIES:
        if value == policy:
            return policy
    raise ValueError(f"must be one of {', '.join(STALENESS_POLICIES)}, got {value!r}")


# (YAML key, field, converter); durations as everywhere in the config ("200ms", "1s", or seconds).
_CONVERSIONS: tuple[tuple[str, str, Callable[[object], object]], ...] = (
    ("queueDepthThreshold", "queue_depth_threshold", _integer),
    ("kvCacheUtilThreshold", "kv_cache_util_threshold", _number),
    ("metricsStalenessThreshold", "metrics_staleness_threshold", parse_duration),
    ("headroom", "headroom", _number),
    ("stalenessPolicy", "staleness_policy", _policy),
    ("holdLastFor", "hold_last_for", parse_duration),
)
# saturationDetector.parameters keys this module reads (the first four are llm-d's names).
SATURATION_KEYS = tuple(key for key, _, _ in _CONVERSIONS)


def endpoint_score(sample: Sample, params: UtilizationParameters) -> float:
    """The roofline score of one fresh sample: its most constrained resource."""
    queue_ratio = sample.waiting / params.queue_depth_threshold
    if sample.kv_usage is None:
        return queue_ratio
    return max(queue_ratio, sample.kv_usage / params.kv_cache_util_threshold)


def pool_saturation(
    samples: Sequence[Sample | None], now: float, params: UtilizationParameters
) -> PoolSaturation:
    """The pool's saturation from each endpoint's latest good sample (None: it has none)."""
    if not samples:
        return PoolSaturation(FAIL_CLOSED_SCORE, 0, 0, 0)
    hold = params.staleness_policy == "holdLast"
    total = 0.0
    stale = held = 0
    for sample in samples:
        if sample is not None and now - sample.at <= params.metrics_staleness_threshold:
            total += endpoint_score(sample, params)
            continue
        stale += 1
        if hold and sample is not None and now - sample.at <= params.hold_bound:
            total += endpoint_score(sample, params)
            held += 1
        else:
            total += FAIL_CLOSED_SCORE
    return PoolSaturation(total / len(samples), len(samples), stale, held)
