"""The two values the utilization detector needs, read from a Prometheus text exposition page.

``parse_metrics`` keeps only the lines of the dialect's metrics (their samples and their HELP and
TYPE lines) and hands those to prometheus_client's parser: a vLLM page carries dozens of
histograms the detector never reads, and at a 50 ms scrape interval parsing all of them in pure
Python would cost more than the scrape itself.

Several series of one metric (labels ``model_name``, ``engine``, ranks, ...) are folded into one
value per endpoint:

- waiting: the **sum**. Each series is a separate queue inside the same server (vLLM writes one
  series per data-parallel engine, SGLang one per scheduler rank), so the requests waiting at the
  endpoint are all of them together.
- KV-cache utilisation: the **max**. Each series is the fill of a separate cache; the endpoint
  cannot take long requests once any of them is full, and a sum of fractions means nothing while
  an average would hide the full one. (llm-d takes the series with the newest timestamp, in
  practice the first one; with one series per server, as is usual, all three agree.)

A value that is not a finite number >= 0 (NaN, +Inf, negative) is dropped as if the series were
absent: one NaN would otherwise turn the pool average into NaN, and ``NaN >= limit`` is false,
which would admit traffic blind. A metric with no usable series reads as None; the detector treats
the endpoint as missing metrics (fail closed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from sidecar.telemetry.dialects import Dialect

__all__ = ["MetricsParseError", "ParsedMetrics", "parse_metrics"]


class MetricsParseError(ValueError):
    """The page is not valid Prometheus text exposition (in the lines the dialect reads)."""


@dataclass(frozen=True, slots=True)
class ParsedMetrics:
    """An endpoint's values as its page reads; None where the metric is absent."""

    waiting: float | None
    kv_usage: float | None
    # Which of the dialect's KV names gave ``kv_usage`` (the first present one), for logs.
    kv_metric: str | None = None


def _relevant_lines(text: str, names: tuple[str, ...]) -> str:
    starts: list[str] = []
    for name in names:
        starts += [name + "{", name + " ", name + "\t", f"# HELP {name} ", f"# TYPE {name} "]
    prefixes = tuple(starts)
    # A sample line with neither labels nor value ("name\n") is malformed: the parser says so.
    bare = frozenset(names)
    kept = [line for line in text.splitlines() if line.startswith(prefixes) or line in bare]
    return "\n".join(kept) + "\n"


def _values(text: str, names: tuple[str, ...]) -> dict[str, list[float]]:
    """Usable sample values by metric name, for the metrics in ``names``."""
    values: dict[str, list[float]] = {name: [] for name in names}
    try:
        for family in text_string_to_metric_families(_relevant_lines(text, names)):
            for sample in family.samples:
                bucket = values.get(sample.name)
                value = float(sample.value)
                if bucket is not None and math.isfinite(value) and value >= 0:
                    bucket.append(value)
    except (ValueError, TypeError, IndexError) as exc:
        raise MetricsParseError(f"not Prometheus text exposition: {exc}") from exc
    return values


def parse_metrics(text: str, dialect: Dialect) -> ParsedMetrics:
    """Waiting (summed over series) and KV usage (max over series) as the page reports them."""
    values = _values(text, dialect.metric_names)
    waiting_values = values[dialect.waiting]
    waiting = math.fsum(waiting_values) if waiting_values else None
    for name in dialect.kv_usage:
        if values[name]:
            return ParsedMetrics(waiting, max(values[name]), name)
    return ParsedMetrics(waiting, None, None)
