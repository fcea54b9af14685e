"""The workload registry: counters kept in Redis by the Lua scripts, read here.

Only the scripts write the counters (atomically, inside each state transition); this module gives
Python a read-only view and the reference math that tests hold the scripts to.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import msgspec

from sidecar import contract
from sidecar.contract import escape_id
from sidecar.policies.base import WorkloadView

if TYPE_CHECKING:
    from sidecar.store.pool import PoolStore


def window_rate(
    bucket: int | None, current: int, previous: int, now_ms: int, window_ms: int
) -> float:
    """Requests per second over a sliding window, estimated from two fixed buckets.

    The previous bucket counts in proportion to how much of it still lies inside the window. Twin of
    ``rate_from`` in lua/includes/registry.lua: same operations in the same order, same doubles.
    """
    if bucket is None:
        return 0.0
    idx = math.floor(now_ms / window_ms)
    f = (now_ms - idx * window_ms) / window_ms
    if bucket == idx:
        est = previous * (1 - f) + current
    elif bucket == idx - 1:
        est = current * (1 - f)
    else:
        est = 0.0
    return est / (window_ms / 1000)


def ema_update(previous: float | None, sample: float, alpha: float) -> float:
    """Exponential moving average; the first sample sets it. Twin of ``record_wait`` in Lua."""
    if previous is None:
        return sample
    return alpha * sample + (1 - alpha) * previous


class WorkloadMetrics(msgspec.Struct, frozen=True):
    workload_id: str
    request_rate: float
    avg_wait_s: float
    dispatched: int
    active: int

    def view(self) -> WorkloadView:
        return WorkloadView(avg_wait_s=self.avg_wait_s, request_rate=self.request_rate)


def _int(value: Any, default: int = 0) -> int:
    return default if value is None else int(value)


# The workload counters' fields (sidecar/contract.py WORKLOAD_FIELDS): the COUNTS record (bucket
# index, its count, the previous bucket's, dispatches, last request, EMA of waits) and active.
METRIC_FIELDS = contract.WORKLOAD_FIELDS


class WorkloadCounters(msgspec.Struct, frozen=True):
    """A workload hash's counters as the scripts wrote them (bucket None: never counted; ema
    None: nothing dispatched yet)."""

    bucket: int | None
    current: int
    previous: int
    dispatched: int
    last_ms: int
    ema: float | None
    active: int


def counters_from_hash(fields: list[Any]) -> WorkloadCounters:
    """``fields`` = HMGET of METRIC_FIELDS, in that order."""
    packed, active = fields
    if packed is None:
        return WorkloadCounters(None, 0, 0, 0, 0, None, _int(active))
    raw = packed.decode() if isinstance(packed, bytes) else str(packed)
    f = contract.COUNTS.parse(raw)
    dispatched = int(f["n"])
    ema = float(f["ema"]) if dispatched > 0 else None
    return WorkloadCounters(
        int(f["bi"]), int(f["c"]), int(f["p"]), dispatched, int(f["t"]), ema, _int(active)
    )


def metrics_from_hash(
    workload_id: str, fields: list[Any], now_ms: int, window_ms: int
) -> WorkloadMetrics:
    """``fields`` = HMGET of METRIC_FIELDS, in that order."""
    k = counters_from_hash(fields)
    return WorkloadMetrics(
        workload_id=workload_id,
        request_rate=window_rate(k.bucket, k.current, k.previous, now_ms, window_ms),
        avg_wait_s=k.ema if k.ema is not None else 0.0,
        dispatched=k.dispatched,
        active=max(k.active, 0),
    )


class WorkloadRegistry:
    """Read-only view of a pool's workload counters (what the workload-aware policy reads)."""

    def __init__(self, store: PoolStore) -> None:
        self._store = store
        self._window_ms = round(store.config.workload_registry.request_rate_window * 1000)

    async def get_metrics(
        self, workload_id: str, now_ms: int | None = None
    ) -> WorkloadMetrics | None:
        """Metrics as of ``now_ms`` (absolute; default Redis TIME); None if unknown or anonymous."""
        if not workload_id:
            return None
        key = self._store.key(contract.workload_key(escape_id(workload_id)))
        fields = await self._store.client.hmget(key, *METRIC_FIELDS)
        if all(f is None for f in fields):
            return None
        rel = await self._store.pool_time(now_ms)
        return metrics_from_hash(workload_id, fields, rel, self._window_ms)

    async def get_request_rate(self, workload_id: str, now_ms: int | None = None) -> float:
        metrics = await self.get_metrics(workload_id, now_ms)
        return metrics.request_rate if metrics else 0.0
