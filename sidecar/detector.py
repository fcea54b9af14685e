"""The utilization detector's scraper, run beside a replica's other loops.

Under ``saturationDetector.type: utilization-detector`` every replica runs one scraper; the pool's
scrape lease in Redis lets one of them at a time scrape the model servers (sidecar/telemetry/).
Each sample goes to Redis through lua/sample.lua, which dispatches what it frees in the same call;
dispatch reads the newest sample atomically with the queue (lua/includes/dispatch.lua).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sidecar.errors import StoreError
from sidecar.store import PoolStore
from sidecar.telemetry import DetectorSettings, ScrapeLease, Scraper, endpoint_source

log = logging.getLogger(__name__)


def make_scraper(store: PoolStore, clock: Callable[[], int | None]) -> Scraper | None:
    """The pool's scraper for this replica, or None under the concurrency detector."""
    config = store.config
    if not config.utilization:
        return None
    settings = DetectorSettings.from_parameters(config.saturation_detector.parameters)
    lease = ScrapeLease(store.client, config.pool, store.replica_id, ttl=settings.scrape.lease_ttl)

    async def write(saturation: float, stale: int, endpoints: int) -> None:
        try:
            await store.sample(saturation, stale, endpoints, now=clock())
        except StoreError as exc:
            # Dispatch fails closed on its own once the newest sample is too old.
            log.warning("saturation sample not written: %s", exc)

    return Scraper(settings, endpoint_source(settings.endpoints), lease, write)
