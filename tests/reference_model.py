"""An in-memory model of one pool, built from the Python reference policies and registry math.

It mirrors what the Lua scripts decide (strict bands, fairness, ordering, registry counters) with
nothing from Redis, so a test can run the same operations on both and compare dispatch orders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sidecar.config import Config
from sidecar.policies import RoundRobinFairness, WorkloadAwareOrdering
from sidecar.policies.base import QueuedItem, WorkloadView
from sidecar.registry import ema_update, window_rate


@dataclass
class Counters:
    bucket: int | None = None
    current: int = 0
    previous: int = 0
    ema: float | None = None


@dataclass
class ModelItem:
    item: QueuedItem
    band: int


@dataclass
class PoolModel:
    config: Config
    inflight: int = 0
    seq: int = 0
    queued: list[ModelItem] = field(default_factory=list)
    workloads: dict[str, Counters] = field(default_factory=dict)
    cursors: dict[int, str] = field(default_factory=dict)

    @property
    def window_ms(self) -> int:
        return round(self.config.workload_registry.request_rate_window * 1000)

    def _count(self, wid: str, now: int) -> None:
        if not wid:
            return
        c = self.workloads.setdefault(wid, Counters())
        idx = math.floor(now / self.window_ms)
        if c.bucket == idx:
            c.current += 1
        elif c.bucket == idx - 1:
            c.bucket, c.previous, c.current = idx, c.current, 1
        else:
            c.bucket, c.previous, c.current = idx, 0, 1

    def metrics(self, wid: str, now: int) -> WorkloadView:
        c = self.workloads.get(wid) if wid else None
        if c is None:
            return WorkloadView()
        rate = window_rate(c.bucket, c.current, c.previous, now, self.window_ms)
        return WorkloadView(avg_wait_s=c.ema or 0.0, request_rate=rate)

    def _record_wait(self, wid: str, wait_ms: int) -> None:
        if wid:
            c = self.workloads[wid]
            c.ema = ema_update(c.ema, wait_ms / 1000.0, self.config.workload_registry.ema_alpha)

    def enqueue(
        self, now: int, band: int, flow: str, wid: str, crit: int, ttl: int
    ) -> tuple[int, list[int]]:
        """Returns (sequence number of the new item, sequence numbers dispatched by this call)."""
        self._count(wid, now)
        self.seq += 1
        item = QueuedItem(seq=self.seq, enqueued_ms=now, deadline_ms=now + ttl, workload_id=wid,
                          criticality=crit, flow=flow)  # fmt: skip
        if not self.queued and self.inflight < self.config.max_concurrency:
            self.inflight += 1
            self._record_wait(wid, 0)
            return self.seq, [self.seq]
        self.queued.append(ModelItem(item, band))
        return self.seq, self._dispatch_ready(now)

    def release(self, now: int) -> list[int]:
        self.inflight -= 1
        return self._dispatch_ready(now)

    def _dispatch_ready(self, now: int) -> list[int]:
        out = []
        while self.inflight < self.config.max_concurrency and self.queued:
            chosen = self._pick(now)
            self.queued.remove(chosen)
            self.inflight += 1
            self._record_wait(chosen.item.workload_id, now - chosen.item.enqueued_ms)
            out.append(chosen.item.seq)
        return out

    def _pick(self, now: int) -> ModelItem:
        band_no = max(m.band for m in self.queued)
        band = self.config.band(band_no)
        candidates = [m for m in self.queued if m.band == band_no]
        if isinstance(band.fairness, RoundRobinFairness):
            flows = sorted({m.item.flow for m in candidates})
            cur = self.cursors.get(band_no)
            flow = next((f for f in flows if cur is not None and f > cur), flows[0])
            self.cursors[band_no] = flow
            candidates = [m for m in candidates if m.item.flow == flow]
        policy = band.ordering

        def lane(m: ModelItem) -> tuple[object, ...]:
            if isinstance(policy, WorkloadAwareOrdering):
                return (m.item.flow, m.item.workload_id, m.item.criticality)
            return (m.item.flow,)

        def in_lane(m: ModelItem) -> tuple[float, int]:
            edf = policy.type_name == "edf-ordering-policy"
            return (float(m.item.deadline_ms) if edf else float(m.item.seq), m.item.seq)

        heads: dict[tuple[object, ...], ModelItem] = {}
        for m in sorted(candidates, key=in_lane):
            heads.setdefault(lane(m), m)
        return min(
            heads.values(),
            key=lambda m: (
                policy.sort_key(m.item, self.metrics(m.item.workload_id, now)),
                m.item.seq,
            ),
        )
