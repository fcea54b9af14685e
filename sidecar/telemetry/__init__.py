"""Model-server telemetry for the ``utilization-detector``: pool saturation from the endpoints'
own metrics, scraped by one replica per pool.

- dialects.py: per model server (vLLM, SGLang, TGI), the names of "requests waiting" and
  "KV-cache utilisation", checked against each server's source;
- parse.py: those two values from a Prometheus text page;
- saturation.py: llm-d's formula and parameters, and the staleness policies;
- endpoints.py: the pool's endpoints, listed or resolved from DNS;
- lease.py: the Redis lease that lets one replica at a time scrape a pool;
- scraper.py: the loop that, holding the lease, scrapes, computes and hands each sample to a sink,
  and ``DetectorSettings.from_parameters``, which validates ``saturationDetector.parameters``.
"""

from sidecar.telemetry.dialects import DIALECTS, Dialect, dialect
from sidecar.telemetry.endpoints import EndpointsConfig, EndpointSource, endpoint_source
from sidecar.telemetry.lease import ScrapeLease, scrape_lease_key
from sidecar.telemetry.parse import MetricsParseError, ParsedMetrics, parse_metrics
from sidecar.telemetry.saturation import (
    PoolSaturation,
    Sample,
    UtilizationParameters,
    pool_saturation,
)
from sidecar.telemetry.scraper import PARAMETER_KEYS, DetectorSettings, SampleSink, Scraper

__all__ = [
    "DIALECTS",
    "PARAMETER_KEYS",
    "DetectorSettings",
    "Dialect",
    "EndpointSource",
    "EndpointsConfig",
    "MetricsParseError",
    "ParsedMetrics",
    "PoolSaturation",
    "Sample",
    "SampleSink",
    "ScrapeLease",
    "Scraper",
    "UtilizationParameters",
    "dialect",
    "endpoint_source",
    "parse_metrics",
    "pool_saturation",
    "scrape_lease_key",
]
