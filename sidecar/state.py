"""A read-only snapshot of a pool's live state: bands, flows, lanes, workloads, replicas.

Served as JSON on the admin port, printed by ``admission-sidecar status`` and exported as the
pool-wide gauges. Reads only; bounded by ``limit`` per list so a huge pool stays cheap to inspect.
"""

from __future__ import annotations

from typing import Any

import msgspec

from sidecar import contract
from sidecar.contract import unescape_id
from sidecar.policies import (
    EdfOrdering,
    RoundRobinFairness,
    SloDeadlineOrdering,
    WorkloadAwareOrdering,
)
from sidecar.registry import METRIC_FIELDS, metrics_from_hash
from sidecar.store.pool import NO_LIMIT, PoolStore


class LaneState(msgspec.Struct):
    lane: str
    flow: str
    workload_id: str  # "" for anonymous (or for fcfs/edf lanes, which hold a whole flow)
    criticality: int
    head_item: str
    # Workload-aware: the head's current score (higher goes first). fcfs: sequence; edf: deadline.
    rank_key: float
    score: float | None


class FlowState(msgspec.Struct):
    flow: str
    queued: int


class BandState(msgspec.Struct):
    priority: int
    queued: int
    queued_bytes: int
    fairness: str
    ordering: str
    flows: list[FlowState]
    lanes: list[LaneState]


class WorkloadState(msgspec.Struct):
    workload_id: str
    request_rate: float
    avg_wait_s: float
    active: int
    dispatched: int
    # Score under the default band's policy at criticality 3 (None: not workload-aware).
    score_at_criticality_3: float | None


class ReplicaState(msgspec.Struct):
    replica_id: str
    lease_left_ms: int
    owned: int


class PoolState(msgspec.Struct):
    pool: str
    max_concurrency: int
    inflight: int
    saturation: float
    queued: int
    queued_bytes: int
    bands: list[BandState]
    workloads: list[WorkloadState]
    replicas: list[ReplicaState]
    anonymous_active: int
    detector: str = "concurrency-detector"
    # Utilization detector: endpoints whose metrics are stale (all of them when the newest
    # sample is itself stale, e.g. no replica scrapes).
    stale_endpoints: int = 0


def _int(value: Any) -> int:
    return int(value) if value is not None else 0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def read_state(store: PoolStore, *, limit: int = 100, now: int | None = None) -> PoolState:
    client, cfg = store.client, store.config
    rel_now = await store.pool_time(now)
    pool = {_text(k): _text(v) for k, v in (await client.hgetall(store.key(contract.POOL))).items()}
    cfg_limit = _int(pool.get("limit")) or cfg.max_concurrency
    inflight = _int(pool.get("inflight"))
    queued_bands = sorted(
        (
            int(field[len(contract.BAND_QUEUED) :])
            for field, n in pool.items()
            if field.startswith(contract.BAND_QUEUED) and n != "0"
        ),
        reverse=True,
    )
    bands = [await _band(store, pool, priority, limit) for priority in queued_bands]
    window_ms = round(cfg.workload_registry.request_rate_window * 1000)
    default_policy = cfg.band(0).ordering
    workloads = []
    for wid in await client.zrevrange(store.key(contract.WORKLOADS), 0, limit - 1):
        name = _text(wid)
        fields = await client.hmget(store.key(contract.workload_key(name)), *METRIC_FIELDS)
        m = metrics_from_hash(unescape_id(name), fields, rel_now, window_ms)
        score = (
            default_policy.score(3, m.view())
            if isinstance(default_policy, WorkloadAwareOrdering)
            else None
        )
        workloads.append(
            WorkloadState(
                m.workload_id, m.request_rate, m.avg_wait_s, m.active, m.dispatched, score
            )
        )
    replicas = []
    replica_set = store.key(contract.REPLICAS)
    for rid, expiry in await client.zrange(replica_set, 0, limit - 1, withscores=True):
        number = pool.get(contract.REPLICA_NUMBER + _text(rid))
        owned = 0
        if number is not None:
            key = store.key(contract.held_key(number))
            # Not the layout field (contract.POOL_LAYOUT) a held hash carries.
            held = await client.hlen(key) - int(await client.hexists(key, contract.POOL_LAYOUT))
            owned = held + _int(pool.get(contract.OWNER_QUEUED + number))
        replicas.append(ReplicaState(_text(rid), int(expiry) - rel_now, owned))
    saturation = inflight / cfg_limit if cfg_limit and cfg_limit < NO_LIMIT else 0.0
    if pool.get("tokLimit"):
        # Tokens or hybrid mode: the fuller of the two budgets.
        saturation = max(saturation, _int(pool.get("tok")) / _int(pool["tokLimit"]))
    if cfg_limit >= NO_LIMIT:
        cfg_limit = 0
    detector, stale = "concurrency-detector", 0
    if pool.get("det") == contract.DETECTOR_UTILIZATION:
        detector, endpoints = "utilization-detector", _int(pool.get("satN"))
        at = pool.get("satT")
        # As dispatch reads it (lua/includes/dispatch.lua has_capacity): stale is saturated.
        if at is not None and rel_now - int(at) <= _int(pool.get("stale")):
            saturation, stale = float(pool.get("sat", "1")), _int(pool.get("satStale"))
        else:
            saturation, stale = 1.0, endpoints
        cfg_limit = 0
    return PoolState(
        pool=cfg.pool,
        max_concurrency=cfg_limit,
        inflight=inflight,
        saturation=saturation,
        detector=detector,
        stale_endpoints=stale,
        queued=_int(pool.get("qn")),
        queued_bytes=_int(pool.get("qbytes")),
        bands=bands,
        workloads=workloads,
        replicas=replicas,
        anonymous_active=max(_int(await client.hget(store.key(contract.ANON), "active")), 0),
    )


async def _band(store: PoolStore, pool: dict[str, str], priority: int, limit: int) -> BandState:
    client = store.client
    band = store.config.band(priority)
    round_robin = isinstance(band.fairness, RoundRobinFairness)
    if round_robin:
        escaped = [
            _text(f) for f in await client.zrange(store.key(contract.FLOWS + str(priority)), 0, -1)
        ]
        ranksets = [store.key(contract.rank_key(priority, flow)) for flow in escaped]
    else:
        ranksets = [store.key(contract.rank_key(priority))]
    # Keys hold escaped flow ids; only what is shown is unescaped. A flow's queued count is the
    # sum of its lanes' lengths (bounded, like every list here, so a huge pool stays cheap).
    members: list[tuple[str, float]] = []
    for rankset in ranksets:
        ranked = await client.zrange(rankset, 0, 10 * limit - 1, withscores=True)
        members += [(_text(m), float(k)) for m, k in ranked]
    lanes = [_lane(m, k, isinstance(band.ordering, WorkloadAwareOrdering)) for m, k in members]
    # A ranking set holds a workload's best lane per set; its group holds all of them. Both
    # reads go in one round trip each, however many lanes there are (/metrics runs this).
    every = {m for m, _ in members}
    groups = client.pipeline(transaction=False)
    for member, _ in members:
        parts = contract.LANE_ID.parse(contract.split_rank_member(member)[1])
        if parts.get("wid"):
            suffix = str(priority) + (contract.RANK_FLOW_SEP + parts["flow"] if round_robin else "")
            groups.zrange(store.key(contract.GROUP + suffix + contract.GROUP_SEP + parts["wid"]),
                          0, 10 * limit - 1)  # fmt: skip
    for ranked in await groups.execute():
        every |= {_text(m) for m in ranked}
    lane_ids = [contract.split_rank_member(m)[1] for m in sorted(every)]
    # edf and slo-deadline lanes are zsets, the others lists (lua/includes/lanes.lua keyed).
    keyed = isinstance(band.ordering, EdfOrdering | SloDeadlineOrdering)
    lengths = client.pipeline(transaction=False)
    for lane_id in lane_ids:
        key = store.key(contract.LANE + lane_id)
        if keyed:
            lengths.zcard(key)
        else:
            lengths.llen(key)
    per_flow: dict[str, int] = {}
    for lane_id, n in zip(lane_ids, await lengths.execute(), strict=True):
        flow = contract.LANE_ID.parse(lane_id)["flow"]
        per_flow[flow] = per_flow.get(flow, 0) + int(n)
    flows = sorted(
        (FlowState(unescape_id(f), n) for f, n in per_flow.items()), key=lambda f: f.flow
    )
    lanes.sort(key=lambda lane: lane.rank_key)
    return BandState(
        priority=priority,
        queued=_int(pool.get(contract.BAND_QUEUED + str(priority))),
        queued_bytes=_int(pool.get(contract.BAND_BYTES + str(priority))),
        fairness=band.fairness.type_name,
        ordering=band.ordering.type_name,
        flows=flows,
        lanes=lanes[:limit],
    )


def _lane(member: str, key: float, workload_aware: bool) -> LaneState:
    head, lane = contract.split_rank_member(member)
    parts = contract.LANE_ID.parse(lane)
    workload = unescape_id(parts.get("wid", ""))
    criticality = int(parts.get("crit", 0))
    # A workload-aware rank key is minus the score (plus the static aging offset), in units of
    # 1 / contract.RANK_KEY_SCALE.
    return LaneState(
        lane,
        unescape_id(parts["flow"]),
        workload,
        criticality,
        head,
        key,
        -key / contract.RANK_KEY_SCALE if workload_aware else None,
    )
