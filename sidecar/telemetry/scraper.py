"""The scrape loop: while this replica holds the pool's scrape lease, read every endpoint's
metrics, compute the pool saturation and hand each sample to a sink.

Every ``scrapeInterval`` (default 50 ms: llm-d's default ``--refresh-metrics-interval``, which is
also its minimum; four scrapes fit in the default 200 ms staleness threshold, so one slow or lost
scrape never turns an endpoint stale) the holder GETs every endpoint's metrics page at once, each
bounded by ``scrapeTimeout`` (default 150 ms: below the staleness threshold, so a hung endpoint
goes stale on time and the round it stretches still leaves the others fresh), keeps each
endpoint's newest good sample, and computes the pool saturation at once
(sidecar/telemetry/saturation.py). The sink gets ``(saturation, stale_endpoints, endpoints)``;
the dispatch side stores it with Redis's time and dispatches when saturation drops.

A failed scrape (connection refused, timeout, non-200, a page that does not parse or lacks the
dialect's metrics) leaves the endpoint's previous good sample in place to age; it counts in
``scrape_failures``. Replicas that do not hold the lease try to take it every scrape interval
(sidecar/telemetry/lease.py has the takeover bound). The loop never dies: any unexpected
exception is logged and the next round runs.

Counters for tests and metrics: ``rounds`` (rounds scraped while holding the lease), ``scrapes``
(endpoint GETs sent), ``scrape_failures``, ``samples`` (sink calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from sidecar.telemetry.dialects import DEFAULT_DIALECT, Dialect, dialect
from sidecar.telemetry.endpoints import ENDPOINT_KEYS, EndpointsConfig, EndpointSource
from sidecar.telemetry.lease import DEFAULT_TTL_S, ScrapeLease
from sidecar.telemetry.parse import MetricsParseError, parse_metrics
from sidecar.telemetry.saturation import (
    SATURATION_KEYS,
    PoolSaturation,
    Sample,
    UtilizationParameters,
    pool_saturation,
)
from sidecar.units import parse_duration

__all__ = [
    "PARAMETER_KEYS",
    "DetectorSettings",
    "SampleSink",
    "ScrapeSettings",
    "Scraper",
]

log = logging.getLogger(__name__)

# (saturation, stale_endpoints, endpoints) -> None
SampleSink = Callable[[float, int, int], Awaitable[None]]

# How often at most the stale-endpoints warning is logged (llm-d: staleWarnInterval).
STALE_WARN_INTERVAL_S = 30.0
ERROR_LOG_INTERVAL_S = 10.0
SCRAPE_KEYS = ("modelServer", "scrapeInterval", "scrapeTimeout", "scrapeLeaseTTL")
# Every key a utilization-detector accepts under saturationDetector.parameters.
PARAMETER_KEYS: frozenset[str] = frozenset((*SATURATION_KEYS, *ENDPOINT_KEYS, *SCRAPE_KEYS))


@dataclass(frozen=True, slots=True)
class ScrapeSettings:
    interval: float = 0.05
    timeout: float = 0.15
    lease_ttl: float = DEFAULT_TTL_S

    def __post_init__(self) -> None:
        if not self.interval > 0:
            raise ValueError("scrapeInterval: must be > 0")
        if not self.timeout > 0:
            raise ValueError("scrapeTimeout: must be > 0")
        # Renewing every ttl/3 needs room for a few rounds in between.
        if not self.lease_ttl >= 3 * self.interval:
            raise ValueError("scrapeLeaseTTL: must be >= 3 x scrapeInterval")


@dataclass(frozen=True, slots=True)
class DetectorSettings:
    """A utilization-detector's parameters, validated."""

    saturation: UtilizationParameters = field(default_factory=UtilizationParameters)
    endpoints: EndpointsConfig = field(default_factory=EndpointsConfig)
    dialect: Dialect = field(default_factory=lambda: dialect(DEFAULT_DIALECT))
    scrape: ScrapeSettings = field(default_factory=ScrapeSettings)

    @classmethod
    def from_parameters(cls, params: Mapping[str, Any]) -> DetectorSettings:
        """From ``saturationDetector.parameters``; ValueError names the offending key."""
        unknown = sorted(set(params) - PARAMETER_KEYS)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown utilization-detector parameter")
        saturation = UtilizationParameters.from_parameters(params)
        endpoints = EndpointsConfig.from_parameters(params)
        server = params.get("modelServer", DEFAULT_DIALECT)
        if not isinstance(server, str):
            raise ValueError(f"modelServer: must be a string, got {server!r}")
        try:
            chosen = dialect(server)
        except ValueError as exc:
            raise ValueError(f"modelServer: {exc}") from None
        durations: dict[str, float] = {}
        for key, name in (
            ("scrapeInterval", "interval"),
            ("scrapeTimeout", "timeout"),
            ("scrapeLeaseTTL", "lease_ttl"),
        ):
            if key in params:
                try:
                    durations[name] = parse_duration(params[key])
                except ValueError as exc:
                    raise ValueError(f"{key}: {exc}") from None
        return cls(saturation, endpoints, chosen, ScrapeSettings(**durations))


def _stop_if_cancelling(exc: BaseException | None = None) -> None:
    """Raises CancelledError if this task is being cancelled. redis-py may catch a cancellation
    inside a command, reconnect and retry, and return normally or raise an error of its own: the
    request to stop must not be lost with it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc


class Scraper:
    """One replica's scrape loop for one pool."""

    def __init__(
        self,
        settings: DetectorSettings,
        source: EndpointSource,
        lease: ScrapeLease,
        sink: SampleSink,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._source = source
        self.lease = lease
        self._sink = sink
        self._session = session
        self._own_session = session is None
        self._clock = clock
        # Each endpoint's newest good sample, by metrics URL.
        self._latest: dict[str, Sample] = {}
        self._next_renewal = float("-inf")
        self._last_stale_warning = float("-inf")
        self._last_error_log = float("-inf")
        self.last: PoolSaturation | None = None
        self.rounds = 0
        self.scrapes = 0
        self.scrape_failures = 0
        self.samples = 0
        self.loop_errors = 0

    async def run(self) -> None:
        """Scrape while holding the lease, stand by otherwise; until cancelled."""
        interval = self.settings.scrape.interval
        while True:
            started = self._clock()
            try:
                await self._keep_lease(started)
                _stop_if_cancelling()
                if self.lease.held():
                    await self.round()
            except Exception as exc:
                _stop_if_cancelling(exc)
                self.loop_errors += 1
                self._log_loop_error(started)
            _stop_if_cancelling()
            await asyncio.sleep(max(0.0, interval - (self._clock() - started)))

    def _log_loop_error(self, now: float) -> None:
        # An unreachable Redis fails every round: the first error and then one per interval.
        if now - self._last_error_log < ERROR_LOG_INTERVAL_S:
            return
        self._last_error_log = now
        log.exception("scrape loop: round failed (%d so far); it keeps running", self.loop_errors)

    async def _keep_lease(self, now: float) -> None:
        # The holder renews every ttl/3; the others try to take it every round.
        if self.lease.held() and now < self._next_renewal:
            return
        try:
            await self.lease.hold()
        finally:
            self._next_renewal = now + self.lease.renew_interval

    async def round(self) -> PoolSaturation:
        """Scrape every endpoint once, compute the pool saturation, give it to the sink."""
        urls = await self._source.urls()
        for gone in self._latest.keys() - set(urls):
            del self._latest[gone]
        results = await asyncio.gather(*(self._scrape(url) for url in urls), return_exceptions=True)
        for url, sample in zip(urls, results, strict=True):
            if isinstance(sample, Sample):
                self._latest[url] = sample
            elif isinstance(sample, BaseException):
                _stop_if_cancelling(sample)
                self.scrape_failures += 1
                log.error("scrape of %s failed unexpectedly", url, exc_info=sample)
        self.rounds += 1
        result = pool_saturation(
            [self._latest.get(url) for url in urls], self._clock(), self.settings.saturation
        )
        self.last = result
        if result.stale:
            self._warn_stale(result)
        if not self.lease.held():
            return result  # lost the lease during the round: the new holder writes
        await self._sink(result.saturation, result.stale, result.endpoints)
        self.samples += 1
        return result

    async def _scrape(self, url: str) -> Sample | None:
        self.scrapes += 1
        session = self._ensure_session()
        try:
            async with asyncio.timeout(self.settings.scrape.timeout):
                async with session.get(url) as response:
                    text = await response.text() if response.status == 200 else None
            if text is None:
                self.scrape_failures += 1
                log.debug("scrape of %s: HTTP %d", url, response.status)
                return None
            parsed = parse_metrics(text, self.settings.dialect)
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError, MetricsParseError) as exc:
            self.scrape_failures += 1
            log.debug("scrape of %s failed: %r", url, exc)
            return None
        dialect = self.settings.dialect
        if parsed.waiting is None or (dialect.has_kv_usage and parsed.kv_usage is None):
            self.scrape_failures += 1
            log.debug("scrape of %s: the page lacks the %s metrics", url, dialect.name)
            return None
        return Sample(parsed.waiting, parsed.kv_usage, self._clock())

    def _warn_stale(self, result: PoolSaturation) -> None:
        # Evaluated every round (20 a second): log on a time budget, as llm-d does.
        now = self._clock()
        if now - self._last_stale_warning < STALE_WARN_INTERVAL_S:
            return
        self._last_stale_warning = now
        log.warning(
            "%d of %d endpoints have missing or stale metrics and score as saturated "
            "(fail closed); if dispatch stalls, check their metrics (path, port, TLS)",
            result.stale,
            result.endpoints,
        )

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.scrape.timeout)
            )
        return self._session

    async def aclose(self) -> None:
        """Give the lease up and close what this scraper opened (after cancelling run())."""
        with contextlib.suppress(Exception):
            await self.lease.release()
        await self._source.aclose()
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None
