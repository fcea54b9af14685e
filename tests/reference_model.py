"""An in-memory model of one pool: the admission contract written once more, in plain Python.

It decides what the Lua scripts decide (strict bands, fairness, lane ordering, queue caps, TTL
eviction, leases, dead-replica reclaim, the recovery hold, registry counters) from the reference
policies (sidecar/policies/) and registry math (sidecar/registry.py), with nothing from Redis, so
a test can run one history on both and compare every reply.

Staleness is modelled as DESIGN.md §4 allows it: a lane's rank key is the head's sort key
computed at the last event that changed it, namely the lane getting a new head, its workload's
counters changing (a request counted, a dispatch's wait recorded) or a maintenance tick. Between
those events a workload's request rate decays while its lanes keep their old keys, exactly as in
the sorted sets. A workload's workload-aware lanes in one ranking set form a group, ranked by its
best lane (the lowest head part of the key, WorkloadAwareOrdering.head_key): the group's key is
the workload part at the last time the group's best changed or its workload was re-ranked, plus
the best lane's head part (lua/includes/lanes.lua). Times are ms relative to the pool's epoch;
item ids are the scripts' ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

from sidecar.config import Config, ResolvedBand
from sidecar.contract import NO_SLO_KEY
from sidecar.outcome import ScriptStatus
from sidecar.policies import (
    EdfOrdering,
    RoundRobinFairness,
    SloDeadlineOrdering,
    WorkloadAwareOrdering,
)
from sidecar.policies.base import QueuedItem, WorkloadView
from sidecar.registry import ema_update, window_rate

# A lane: (band, flow) for fcfs and edf; (band, flow, workload, criticality) for workload-aware.
LaneId = tuple[object, ...]
# A group: (band, flow under round-robin else '', workload).
GroupId = tuple[int, str, str]
# At most this many dead replicas are reclaimed per maintenance run (lua/maintain.lua).
RECLAIM_REPLICAS = 10


def item_id(seq: int) -> str:
    return f"{seq:016d}"


class Reply(NamedTuple):
    status: int
    item_id: str
    detail: str


class Event(NamedTuple):
    """An outcome for an item, delivered to its owner (in the reply or through its inbox)."""

    owner: str
    item_id: str
    status: int
    wait_ms: int


class Maintained(NamedTuple):
    ran: bool
    evicted: int
    reclaimed: int


@dataclass
class Counters:
    """A workload's registry entry (anonymous traffic has one too)."""

    bucket: int | None = None
    current: int = 0
    previous: int = 0
    ema: float | None = None
    dispatched: int = 0
    active: int = 0


@dataclass(frozen=True)
class Item:
    seq: int
    owner: str
    band: int
    flow: str
    wid: str
    crit: int
    size: int
    enq: int
    deadline: int
    lease: int
    tok: int = 0
    slo: int = 0

    @property
    def id(self) -> str:
        return item_id(self.seq)


@dataclass(frozen=True)
class Held:
    owner: str
    wid: str
    tok: int = 0


@dataclass
class PoolModel:
    config: Config
    hold: int = 0
    seq: int = 0
    queued: dict[str, Item] = field(default_factory=dict)
    inflight: dict[str, Held] = field(default_factory=dict)
    leases: dict[str, int] = field(default_factory=dict)
    own: dict[str, set[str]] = field(default_factory=dict)
    replicas: dict[str, int] = field(default_factory=dict)
    workloads: dict[str, Counters] = field(default_factory=dict)
    # Lane -> (rank key, head id): what the lane's ranking set entry holds; for a grouped lane
    # (workload-aware, tracked workload) the head part of the key, as its group's zset holds it.
    rank: dict[LaneId, tuple[float, str]] = field(default_factory=dict)
    # Group -> (rank key, best head id, best lane): the group's entry in its ranking set.
    groups: dict[GroupId, tuple[float, str, LaneId]] = field(default_factory=dict)
    cursors: dict[int, str] = field(default_factory=dict)
    maintenance_due: float = -math.inf

    @property
    def window_ms(self) -> int:
        return round(self.config.workload_registry.request_rate_window * 1000)

    # Registry ------------------------------------------------------------------------------
    def counters(self, wid: str) -> Counters:
        return self.workloads.setdefault(wid, Counters())

    def _count(self, wid: str, now: int) -> None:
        c = self.counters(wid)
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
        c = self.counters(wid)
        alpha = self.config.workload_registry.ema_alpha
        c.ema = ema_update(c.ema if c.dispatched else None, wait_ms / 1000.0, alpha)
        c.dispatched += 1

    def _done(self, wid: str) -> None:
        c = self.counters(wid)
        c.active = max(c.active - 1, 0)

    # Lanes and ranking -----------------------------------------------------------------------
    def _band(self, band: int) -> ResolvedBand:
        return self.config.band(band)

    def lane_of(self, item: Item) -> LaneId:
        if isinstance(self._band(item.band).ordering, WorkloadAwareOrdering):
            return (item.band, item.flow, item.wid, item.crit)
        return (item.band, item.flow)

    def _in_lane(self, item: Item) -> tuple[int, int]:
        ordering = self._band(item.band).ordering
        if isinstance(ordering, EdfOrdering):
            return (item.deadline, item.seq)
        if isinstance(ordering, SloDeadlineOrdering):
            key = item.enq + item.slo if item.slo > 0 else NO_SLO_KEY + item.seq
            return (key, item.seq)
        return (item.seq, item.seq)

    def _fits(self, tok: int) -> bool:
        """The concurrency detector: the request limit, and in tokens or hybrid mode the token
        budget (a request past the whole budget goes alone)."""
        limit = self.config.request_limit
        if limit is not None and len(self.inflight) >= limit:
            return False
        budget = self.config.token_limit
        held = sum(h.tok for h in self.inflight.values())
        return budget is None or held == 0 or held + tok <= budget

    def _head(self, lane: LaneId) -> Item | None:
        members = [m for m in self.queued.values() if self.lane_of(m) == lane]
        return min(members, key=self._in_lane, default=None)

    def _key(self, head: Item, now: int) -> float:
        policy = self._band(head.band).ordering
        if not isinstance(policy, WorkloadAwareOrdering):
            return float(self._in_lane(head)[0])
        item = QueuedItem(seq=head.seq, enqueued_ms=head.enq, deadline_ms=head.deadline,
                          workload_id=head.wid, criticality=head.crit, flow=head.flow)  # fmt: skip
        return policy.sort_key(item, self.metrics(head.wid, now))

    @staticmethod
    def _grouped(lane: LaneId) -> bool:
        return len(lane) == 4 and bool(lane[2])

    def _group_of(self, lane: LaneId) -> GroupId:
        rr = isinstance(self._band(int(str(lane[0]))).fairness, RoundRobinFairness)
        return (int(str(lane[0])), str(lane[1]) if rr else "", str(lane[2]))

    def _wa(self, band: int) -> WorkloadAwareOrdering:
        policy = self._band(band).ordering
        assert isinstance(policy, WorkloadAwareOrdering)
        return policy

    def _head_key(self, head: Item) -> float:
        item = QueuedItem(seq=head.seq, enqueued_ms=head.enq, deadline_ms=head.deadline,
                          workload_id=head.wid, criticality=head.crit, flow=head.flow)  # fmt: skip
        return self._wa(head.band).head_key(item)

    def _rank_lane(self, lane: LaneId, now: int) -> None:
        head = self._head(lane)
        if head is None:
            self.rank.pop(lane, None)
        elif self._grouped(lane):
            self.rank[lane] = (self._head_key(head), head.id)
        else:
            self.rank[lane] = (self._key(head, now), head.id)
        if self._grouped(lane):
            self._refresh_group(self._group_of(lane), now)

    def _refresh_group(self, gid: GroupId, now: int) -> None:
        """The group's entry follows its best lane; it is rewritten only when the best changes."""
        members = [
            (key, head, lane)
            for lane, (key, head) in self.rank.items()
            if self._grouped(lane) and self._group_of(lane) == gid
        ]
        best = min(members, default=None, key=lambda m: (m[0], m[1]))
        current = self.groups.get(gid)
        if best is None:
            self.groups.pop(gid, None)
        elif current is None or current[1] != best[1]:
            part = self._wa(gid[0]).workload_key(self.metrics(gid[2], now))
            self.groups[gid] = (part + best[0], best[1], best[2])

    def _rerank_workload(self, wid: str, now: int) -> None:
        """Every group of ``wid`` gets its workload part at ``now``."""
        for gid, (_, head, lane) in list(self.groups.items()):
            if gid[2] == wid:
                part = self._wa(gid[0]).workload_key(self.metrics(wid, now))
                self.groups[gid] = (part + self.rank[lane][0], head, lane)

    # Queue structures ------------------------------------------------------------------------
    def _queue(self, item: Item, now: int) -> None:
        lane = self.lane_of(item)
        self.queued[item.id] = item
        # Only a new lane, or an EDF lane with an earlier deadline, gets a new head.
        keyed = isinstance(self._band(item.band).ordering, EdfOrdering | SloDeadlineOrdering)
        if lane not in self.rank or keyed:
            self._rank_lane(lane, now)

    def _unqueue(self, item: Item, now: int) -> None:
        lane = self.lane_of(item)
        del self.queued[item.id]
        if self.rank[lane][1] == item.id:
            self._rank_lane(lane, now)

    def _release(self, iid: str) -> bool:
        held = self.inflight.pop(iid, None)
        if held is None:
            return False
        self.own.get(held.owner, set()).discard(iid)
        self.leases.pop(iid, None)
        self._done(held.wid)
        return True

    def _drop_queued(self, iid: str, now: int) -> Item | None:
        item = self.queued.get(iid)
        if item is None:
            return None
        self._unqueue(item, now)
        self.own.get(item.owner, set()).discard(iid)
        self._done(item.wid)
        return item

    def _over_caps(self, band: int, size: int) -> bool:
        fc, b = self.config.flow_control, self._band(band)
        in_band = [m for m in self.queued.values() if m.band == band]
        qbytes = sum(m.size for m in self.queued.values())
        bbytes = sum(m.size for m in in_band)
        return (
            (fc.max_requests > 0 and len(self.queued) >= fc.max_requests)
            or (fc.max_bytes > 0 and qbytes + size > fc.max_bytes)
            or (b.max_requests > 0 and len(in_band) >= b.max_requests)
            or (b.max_bytes > 0 and bbytes + size > b.max_bytes)
        )

    # Dispatch ---------------------------------------------------------------------------------
    def _pick(self) -> str:
        band = max(m.band for m in self.queued.values())
        lanes = {lane: entry for lane, entry in self.rank.items() if lane[0] == band}
        groups = {g: (key, head) for g, (key, head, _) in self.groups.items() if g[0] == band}
        if isinstance(self._band(band).fairness, RoundRobinFairness):
            flows = sorted({str(lane[1]) for lane in lanes})
            cur = self.cursors.get(band)
            flow = next((f for f in flows if cur is not None and f > cur), flows[0])
            self.cursors[band] = flow
            lanes = {lane: entry for lane, entry in lanes.items() if lane[1] == flow}
            groups = {g: entry for g, entry in groups.items() if g[1] == flow}
        entries = [e for lane, e in lanes.items() if not self._grouped(lane)]
        return min([*entries, *groups.values()])[1]

    def _dispatch_ready(self, caller: str, now: int, out: list[Event]) -> None:
        if now < self.hold:
            return
        while self.queued and self._fits(0):
            item = self.queued[self._pick()]
            if item.tok > 0 and not self._fits(item.tok):
                break  # it stays at the head: nothing behind it overtakes it
            self._unqueue(item, now)
            self.inflight[item.id] = Held(item.owner, item.wid, item.tok)
            if item.lease > 0:
                self.leases[item.id] = now + item.lease
                self.own[item.owner].discard(item.id)
            wait = max(now - item.enq, 0)
            self._record_wait(item.wid, wait)
            if item.wid:
                self._rerank_workload(item.wid, now)
            out.append(Event(item.owner, item.id, ScriptStatus.DISPATCHED, wait))

    # Transitions (one per script) ---------------------------------------------------------------
    def enqueue(self, now: int, caller: str, band: int, flow: str, wid: str, crit: int,
                size: int, ttl: int, lease: int, tok: int = 0,
                slo: int = 0) -> tuple[Reply, list[Event]]:  # fmt: skip
        # Counted before any check, so a rejected request still raises its workload's rate.
        self._count(wid, now)
        if wid:
            self._rerank_workload(wid, now)
        out: list[Event] = []
        if not self.queued and now >= self.hold and self._fits(tok):
            self.seq += 1
            iid = item_id(self.seq)
            self.inflight[iid] = Held(caller, wid, tok)
            self.counters(wid).active += 1
            if lease > 0:
                self.leases[iid] = now + lease
            else:
                self.own.setdefault(caller, set()).add(iid)
            self._record_wait(wid, 0)
            return Reply(ScriptStatus.DISPATCHED, iid, "0"), out
        if self._over_caps(band, size):
            return Reply(ScriptStatus.REJECTED_CAPACITY, "", ""), out
        self.seq += 1
        item = Item(self.seq, caller, band, flow, wid, crit, size, now, now + ttl, lease, tok, slo)
        self._queue(item, now)
        self.counters(wid).active += 1
        self.own.setdefault(caller, set()).add(item.id)
        self._dispatch_ready(caller, now, out)
        mine = next((e for e in out if e.item_id == item.id), None)
        if mine is None:
            return Reply(ScriptStatus.QUEUED, item.id, ""), out
        out.remove(mine)
        return Reply(ScriptStatus.DISPATCHED, item.id, str(mine.wait_ms)), out

    def release(self, now: int, caller: str, iid: str) -> tuple[Reply, list[Event]]:
        out: list[Event] = []
        if not self._release(iid):
            return Reply(ScriptStatus.NOT_FOUND, iid, ""), out
        self._dispatch_ready(caller, now, out)
        return Reply(ScriptStatus.DISPATCHED, iid, ""), out

    def cancel(self, now: int, caller: str, iid: str, reason: int) -> tuple[Reply, list[Event]]:
        out: list[Event] = []
        if self._drop_queued(iid, now) is not None:
            return Reply(reason, iid, ""), out
        if iid not in self.inflight:
            return Reply(ScriptStatus.NOT_FOUND, iid, ""), out
        if reason != ScriptStatus.EVICTED_CANCELLED:
            return Reply(ScriptStatus.DISPATCHED, iid, ""), out
        self._release(iid)
        self._dispatch_ready(caller, now, out)
        return Reply(ScriptStatus.DISPATCHED, iid, "released"), out

    def heartbeat(self, now: int, replica: str, lease: int) -> bool:
        known = replica in self.replicas
        self.replicas[replica] = now + lease
        return known

    def renew(self, now: int, iid: str, lease: int) -> bool:
        if iid not in self.inflight:
            return False
        # A slot its replica held becomes a ticket's (lua/renew.lua): from now on only its lease
        # or a release ends it, not its replica's death.
        self.own.get(self.inflight[iid].owner, set()).discard(iid)
        self.leases[iid] = now + lease
        return True

    def reclaim_size(self, now: int) -> int:
        """The most items one dead replica due now owns (its set is popped in random order, so a
        test passes a budget at least this large to keep the run deterministic)."""
        due = [r for r, exp in self.replicas.items() if exp <= now]
        return max((len(self.own.get(r, ())) for r in due), default=0)

    def maintain(self, now: int, caller: str, interval: int, budget: int,
                 force: bool) -> tuple[Maintained, list[Event]]:  # fmt: skip
        out: list[Event] = []
        if not force and now < self.maintenance_due:
            return Maintained(False, 0, 0), out
        self.maintenance_due = now + interval
        evicted = self._evict(now, budget, out)
        reclaimed = self._free_leases(now, budget) + self._reclaim(now, caller, budget, out)
        for wid in {str(lane[2]) for lane in self.rank if len(lane) == 4 and lane[2]}:
            self._rerank_workload(wid, now)
        self._dispatch_ready(caller, now, out)
        return Maintained(True, evicted, reclaimed), out

    def _evict(self, now: int, budget: int, out: list[Event]) -> int:
        # The scripts keep deadlines in per-second buckets (includes/lanes.lua) and sweep whole
        # past seconds, each in arrival order.
        second = now // 1000
        expired = sorted(
            (m.deadline // 1000, m.id) for m in self.queued.values() if m.deadline // 1000 < second
        )
        for _, iid in expired[:budget]:
            item = self._drop_queued(iid, now)
            assert item is not None
            out.append(Event(item.owner, iid, ScriptStatus.EVICTED_TTL, now - item.enq))
        return len(expired[:budget])

    def _free_leases(self, now: int, budget: int) -> int:
        expired = sorted((exp, iid) for iid, exp in self.leases.items() if exp <= now)[:budget]
        for _, iid in expired:
            if not self._release(iid):
                del self.leases[iid]
        return len(expired)

    def _reclaim(self, now: int, caller: str, budget: int, out: list[Event]) -> int:
        dead = sorted((exp, r) for r, exp in self.replicas.items() if exp <= now)
        reclaimed = 0
        for _, replica in dead[:RECLAIM_REPLICAS]:
            own = self.own.get(replica, set())
            for iid in sorted(own)[:budget]:
                own.discard(iid)
                if self._drop_queued(iid, now) is not None or self._release(iid):
                    reclaimed += 1
            if not own:
                del self.replicas[replica]
                # Its inbox is deleted with it: wake-ups sent to it in this call are gone.
                if replica != caller:
                    out[:] = [e for e in out if e.owner != replica]
        return reclaimed
