"""Typed access to one pool's scripts and state.

The same class serves a real Redis (standalone, Sentinel-resolved or cluster) and the embedded
store (fakeredis with Lua): the scripts are the whole behaviour, so both run the same code.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, NamedTuple

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from sidecar import contract
from sidecar.breaker import CircuitBreaker
from sidecar.config import Config, ResolvedBand
from sidecar.errors import ConfigConflictError, LayoutMismatchError, StoreError
from sidecar.keys import pool_prefix
from sidecar.outcome import ScriptStatus
from sidecar.policies import WorkloadAwareOrdering
from sidecar.store.coalesce import Coalescer, Operation
from sidecar.store.scripts import function_name, library

log = logging.getLogger(__name__)

INBOX_BATCH = 1000
# Scripts whose second run changes nothing the first did not (TimeoutError is never retried: the
# first run may still be executing).
IDEMPOTENT_SCRIPTS = frozenset(
    {"configure", "release", "cancel", "heartbeat", "maintain", "renew", "reregister", "reconcile"}
)


class Delivery(NamedTuple):
    """An outcome for an item owned by the caller, reported by a script or read from the inbox."""

    item_id: str
    status: ScriptStatus
    wait_ms: int

    @classmethod
    def parse(cls, raw: bytes | str) -> Delivery:
        text = raw.decode() if isinstance(raw, bytes) else raw
        f = contract.DELIVERY.parse(text)
        return cls(f["id"], ScriptStatus(int(f["status"])), int(f["wait"]))


class ScriptReply(NamedTuple):
    status: ScriptStatus
    item_id: str
    detail: str
    deliveries: list[Delivery]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# Status by code: a dict lookup costs a fraction of the enum's constructor, once per reply.
_STATUS_BY_CODE = {int(status): status for status in ScriptStatus}


def _status(code: Any) -> ScriptStatus:
    status = _STATUS_BY_CODE.get(code) if type(code) is int else None
    return ScriptStatus(int(code)) if status is None else status


def _parse_reply(raw: list[Any] | bytes | int, item_id: str = "") -> ScriptReply:
    """A script's reply, or a coalesced operation's given as one string (contract OP_REPLY) or,
    for a release of ``item_id``, as its status alone."""
    if isinstance(raw, int):
        return ScriptReply(_status(raw), item_id, "", [])
    if isinstance(raw, bytes):
        code, item_id, detail = raw.decode().split(contract.SEP, 2)
        return ScriptReply(_status(int(code)), item_id, detail, [])
    status = _status(raw[0])
    if len(raw) < 3:
        return ScriptReply(status, "", "", [])
    return ScriptReply(status, _text(raw[1]), _text(raw[2]), [Delivery.parse(r) for r in raw[3:]])


def encode_band(band: ResolvedBand) -> str:
    """A band as configure.lua expects it (sidecar/contract.py BAND_CONFIG)."""
    ordering = band.ordering
    numbers = (
        ordering.lua_parameters()
        if isinstance(ordering, WorkloadAwareOrdering)
        else [0] * contract.BAND_POLICY_NUMBERS
    )
    return contract.BAND_CONFIG.encode(
        band.fairness.lua_code, ordering.lua_code, band.max_requests, band.max_bytes, *numbers
    )


# No request limit under the utilization detector: the model servers' metrics decide.
NO_LIMIT = 10**12


def utilization_fields(config: Config) -> dict[str, object]:
    """The pool fields of the utilization detector (lua/includes/dispatch.lua has_capacity)."""
    from sidecar.telemetry import DetectorSettings

    settings = DetectorSettings.from_parameters(config.saturation_detector.parameters)
    sat, scrape = settings.saturation, settings.scrape
    # A healthy scraper rewrites the sample every interval, each scrape taking up to its
    # timeout; a sample older than that plus the staleness threshold means no one scrapes.
    stale_s = sat.metrics_staleness_threshold + scrape.interval + scrape.timeout
    if sat.staleness_policy == "holdLast":
        stale_s = max(stale_s, sat.hold_bound)
    return {
        "limit": NO_LIMIT,
        "det": contract.DETECTOR_UTILIZATION,
        "stale": round(stale_s * 1000),
        "qdt": sat.queue_depth_threshold,
        "head": repr(float(sat.headroom)),
    }


def encode_config(config: Config) -> list[str]:
    fc, reg = config.flow_control, config.workload_registry
    pairs: dict[str, object] = {
        "limit": config.request_limit or NO_LIMIT,
        "maxReq": fc.max_requests,
        "maxBytes": int(fc.max_bytes),
        "win": round(reg.request_rate_window * 1000),
        "alpha": repr(float(reg.ema_alpha)),
        "idle": round(reg.idle_timeout * 1000),
        "maxTracked": reg.max_tracked,
        contract.CFG_BAND_DEFAULT: encode_band(config.template_band(0)),
    }
    if config.utilization:
        pairs.update(utilization_fields(config))
    if config.token_limit is not None:
        pairs["tokLimit"] = config.token_limit
    # Unlisted negative bands: lua/includes/config.lua band_cfg falls back from the negative
    # template to the default one.
    if fc.default_negative_priority_band is not None:
        pairs[contract.CFG_BAND_NEGATIVE] = encode_band(config.template_band(-1))
    for priority, band in config.bands.items():
        pairs[contract.CFG_BAND + str(priority)] = encode_band(band)
    return [str(x) for kv in pairs.items() for x in kv]


class Beat(NamedTuple):
    """A heartbeat's answer: whether the pool knew the replica, the pool's epoch, and whether
    the pool's count of the replica's items differs from the replica's own (reconcile)."""

    known: bool
    epoch: int
    differs: bool = False


class Reconciled(NamedTuple):
    released: int
    readded: int
    dropped: int
    missing: list[str]


LostHook = Callable[[int | None], Awaitable[None]]
Sink = Callable[[list[Delivery]], None]


class PoolStore:
    """One pool's state, shared by every replica through its scripts. Times are absolute ms.

    Every reply that reports outcomes of this replica's items hands them to ``sink`` at the moment
    it is parsed, in the task that made the call (for coalesced calls, the batch's own task), so
    no caller's cancellation can lose a dispatch meant for another request. Every call runs
    inside the circuit breaker's ``guard``, so the breaker judges store calls, not queue waits.
    """

    def __init__(
        self,
        client: Any,
        config: Config,
        replica_id: str,
        *,
        inbox_client: Any = None,
        timer: Callable[[str], AbstractContextManager[None]] | None = None,
        coalesce: bool = True,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        # Wraps every script call (metrics: latency and errors per script).
        self._timer = timer or (lambda _name: nullcontext())
        self.client = client
        # Blocking pops hold a connection for seconds: they get their own client, whose socket
        # timeout is longer than the block, so the main client's short timeout stays strict.
        self.inbox_client = inbox_client if inbox_client is not None else client
        self.config = config
        self.replica_id = replica_id
        self.prefix = pool_prefix(config.pool)
        self.breaker = breaker
        self.epoch = 0  # the pool's epoch as last seen by configure or heartbeat
        self._keys = [self.prefix]
        self._config_args = encode_config(config)
        # Where outcomes of this replica's items go (the flow controller sets it).
        self.sink: Sink = lambda _deliveries: None
        # Runs when a script finds the pool unconfigured (Redis lost its data): the controller
        # re-registers what it holds before the call is retried. Default: just configure.
        self.on_lost: LostHook = self._configure_only
        # Calls with an explicit time (tests) go one by one; real-time calls are coalesced.
        self._coalescer = Coalescer(self._send_batch) if coalesce else None

    def key(self, suffix: str) -> str:
        return self.prefix + suffix

    async def _configure_only(self, now: int | None) -> None:
        await self.configure(now)

    async def _run(self, name: str, args: Sequence[object]) -> list[Any]:
        guard = self.breaker.guard() if self.breaker is not None else nullcontext()
        with guard:
            try:
                with self._timer(name):
                    return await self._run_once(name, args)
            except RedisError as exc:
                raise StoreError(f"{name}: {exc}") from exc

    async def _fcall(self, name: str, args: Sequence[object]) -> list[Any]:
        """Calls the script's function; loads the library first where Redis lacks it (a new or
        restarted Redis, a new version of the sidecar, a cluster node that just joined)."""
        function = function_name(name)
        try:
            result: list[Any] = await self.client.fcall(
                function, len(self._keys), *self._keys, *args
            )
        except ResponseError as exc:
            if "function not found" not in str(exc).lower():
                raise
            await self.client.function_load(library()[1], replace=True)
            result = await self.client.fcall(function, len(self._keys), *self._keys, *args)
        return result

    async def _run_once(self, name: str, args: Sequence[object]) -> list[Any]:
        try:
            result: list[Any] = await self._fcall(name, args)
        except RedisConnectionError:
            # A pooled connection can be dead (Redis restarted): so are its idle siblings, and
            # each would fail one request when next used. Drop them all now.
            await self._drop_idle_connections()
            # Retry once on a fresh one, but only scripts that are safe to run twice: a repeated
            # enqueue would take two places.
            if name not in IDEMPOTENT_SCRIPTS:
                raise
            result = await self._fcall(name, args)
        return result

    async def _drop_idle_connections(self) -> None:
        pool = getattr(self.client, "connection_pool", None)
        disconnect = getattr(pool, "disconnect", None)
        if disconnect is None:
            return  # a cluster client: it manages its nodes' connections itself
        try:
            await disconnect(inuse_connections=False)
        except (RedisError, OSError) as exc:
            log.debug("dropping idle connections: %s", exc)

    async def _call(self, name: str, now: int | None, *args: object) -> list[Any]:
        """Runs a script; if the pool has no configuration (Redis lost its data), runs the
        recovery hook (configure, re-register) and retries once."""
        stamp = "" if now is None else str(now)
        raw = await self._run(name, [stamp, *args])
        if _no_config(raw):
            self._refuse_foreign_layout(raw)
            log.warning("pool %s has no configuration in Redis (restarted?)", self.config.pool)
            await self.on_lost(now)
            raw = await self._run(name, [stamp, *args])
            if _no_config(raw):
                raise StoreError(f"{name}: the pool lost its configuration again")
        return raw

    async def call_direct(self, name: str, now: int | None, *args: object) -> list[Any]:
        """A script call that does not run the recovery hook (the hook's own calls)."""
        raw = await self._run(name, ["" if now is None else str(now), *args])
        if _no_config(raw):
            self._refuse_foreign_layout(raw)
            raise StoreError(f"{name}: the pool has no configuration")
        return raw

    def _refuse_foreign_layout(self, raw: Sequence[Any]) -> None:
        """A script found no configuration because the pool is in another Redis layout (the
        reply carries the pool's layout note): nothing to recover, so no configure is run."""
        if len(raw) > 1 and raw[1] is not None:
            raise LayoutMismatchError(self._layout_message(_text(raw[1])))

    def _layout_message(self, note: str) -> str:
        return (
            f"pool {self.config.pool!r} in Redis is in another layout "
            f"({contract.layout_named(note)!r}); "
            f"this sidecar reads and writes layout {contract.LAYOUT_VERSION}. Two versions "
            "with different layouts cannot share a pool: give this version its own pool name "
            "or Redis database, or stop the other version's replicas and delete the pool's keys "
            "(docs/upgrading.md)"
        )

    def _reply(self, raw: list[Any] | bytes | int, item_id: str = "") -> ScriptReply:
        reply = _parse_reply(raw, item_id)
        if reply.deliveries:
            self.sink(reply.deliveries)
        return reply

    async def configure(self, now: int | None = None, *, recovering: bool = False) -> bool:
        """Writes this replica's configuration; True if the pool was fresh.

        ``recovering``: this replica saw the pool before, so a fresh pool means Redis lost its
        data, and the new pool holds dispatch for ``redis.recoveryHold`` while live replicas
        re-register. A replica that never saw the pool cannot tell a lost pool from a new one."""
        hold_ms = round(self.config.redis.recovery_hold_s * 1000) if recovering else 0
        args = ["" if now is None else str(now), *self._config_args, "recover", str(hold_ms)]
        raw = await self._run("configure", args)
        if int(raw[0]) == ScriptStatus.LAYOUT_MISMATCH:
            raise LayoutMismatchError(self._layout_message(_text(raw[1])))
        if int(raw[0]) == ScriptStatus.CONFLICT:
            raise ConfigConflictError(
                f"band {_text(raw[1])} has queued requests under a different fairness or ordering "
                "policy; drain it before changing its policies"
            )
        self.epoch = int(raw[1])
        return int(raw[0]) == 1

    def submit_enqueue(
        self,
        *,
        band: int,
        flow: str,
        workload: str,
        criticality: int,
        byte_size: int,
        ttl_ms: int,
        lease_ms: int = 0,
        tokens: int = 0,
        slo_ms: int = 0,
        now: int | None = None,
        direct: bool = False,
    ) -> asyncio.Future[ScriptReply]:
        """Starts an enqueue; the future is owned by the store, not the caller, so cancelling
        whoever awaits it does not stop the call or lose its reply. Flow and workload must
        already be escaped (sidecar.keys.escape_id). ``direct`` skips coalescing and the
        recovery hook (recovery's own re-enqueues)."""
        args = [band, flow, workload, criticality, byte_size, ttl_ms, lease_ms, tokens, slo_ms]
        if self._coalescer is not None and now is None and not direct:
            return self._coalescer.submit((contract.OP_ENQUEUE, args))
        call = self.call_direct if direct else self._call
        return asyncio.ensure_future(self._single("enqueue", call, now, args))

    def submit_release(
        self, item_id: str, now: int | None = None, *, held: tuple[str, int] | None = None
    ) -> asyncio.Future[ScriptReply]:
        """Starts a release (idempotent); the future is the store's, as for submit_enqueue.
        ``held``: the escaped workload and the tokens this replica enqueued the request with,
        when it holds the slot (contract.BATCH_RELEASE_HELD: the pool then deletes the slot's
        record without reading it first)."""
        args: list[object] = [item_id]
        kind = contract.OP_RELEASE
        if held is not None:
            kind, args = contract.OP_RELEASE_HELD, [item_id, held[1], held[0]]
        if self._coalescer is not None and now is None:
            return self._coalescer.submit((kind, args))
        return asyncio.ensure_future(self._single("release", self._call, now, args))

    async def _single(
        self,
        name: str,
        call: Callable[..., Awaitable[list[Any]]],
        now: int | None,
        args: list[object],
    ) -> ScriptReply:
        return self._reply(await call(name, now, self.replica_id, *args))

    async def enqueue(self, **kwargs: Any) -> ScriptReply:
        """submit_enqueue, awaited; the call completes even if the caller is cancelled."""
        return await asyncio.shield(self.submit_enqueue(**kwargs))

    async def release(
        self, item_id: str, now: int | None = None, *, held: tuple[str, int] | None = None
    ) -> ScriptReply:
        return await asyncio.shield(self.submit_release(item_id, now, held=held))

    async def _send_batch(self, ops: Sequence[Operation]) -> list[ScriptReply]:
        """One round trip for coalesced operations (a lone one goes as its own script)."""
        if len(ops) == 1:
            ((kind, args),) = ops
            name = "enqueue" if kind == contract.OP_ENQUEUE else "release"
            return [self._reply(await self._call(name, None, self.replica_id, *args))]
        raw = await self._call("batch", None, self.replica_id, contract.batch_ops(ops))
        # (A release's reply may be its status alone: it is given the id it released.)
        return [self._reply(r, str(args[0])) for r, (_, args) in zip(raw, ops, strict=True)]

    async def cancel(
        self, item_id: str, reason: ScriptStatus, now: int | None = None
    ) -> ScriptReply:
        """Takes a queued item out; runs to the end even if the caller is cancelled."""
        call = self._call("cancel", now, self.replica_id, item_id, int(reason))
        return self._reply(await asyncio.shield(asyncio.ensure_future(call)))

    async def heartbeat(
        self,
        lease_ms: int,
        now: int | None = None,
        *,
        owned: int | None = None,
        direct: bool = False,
    ) -> Beat:
        """Renews this replica's lease. ``known`` False: the pool did not know the replica (its
        first beat, its lease ran out, or the pool is new: compare ``epoch``). ``owned``: how
        many items the replica knows it owns, compared with the pool's count. ``direct`` skips
        the recovery hook (recovery's own beat)."""
        count = "" if owned is None else str(owned)
        call = self.call_direct if direct else self._call
        raw = await call("heartbeat", now, self.replica_id, lease_ms, count)
        beat = Beat(int(raw[0]) == 1, int(raw[1]), len(raw) > 2 and int(raw[2]) == 1)
        self.epoch = beat.epoch
        return beat

    async def reconcile(
        self,
        held: Sequence[tuple[str, str, int]],
        queued: Sequence[str],
        grace_ms: int,
        now: int | None = None,
    ) -> Reconciled:
        """Makes the pool's record of this replica's items match ``held`` (item id, escaped
        workload id, tokens) and ``queued`` (item ids); see lua/reconcile.lua."""
        flat = [str(x) for slot in held for x in slot]
        raw = await self._call(
            "reconcile", now, self.replica_id, grace_ms, len(held), *flat, *queued
        )
        reply = self._reply(raw)
        counts = contract.RECONCILED.parse(reply.item_id)
        released, readded, dropped = (int(counts[f]) for f in contract.RECONCILED.names())
        missing = [m for m in reply.detail.split(contract.ID_LIST_SEP) if m]
        return Reconciled(released, readded, dropped, missing)

    async def maintain(
        self, interval_ms: int, budget: int = 500, *, force: bool = False, now: int | None = None
    ) -> list[Delivery]:
        raw = await self._call(
            "maintain", now, self.replica_id, interval_ms, budget, "1" if force else "0"
        )
        deliveries = [Delivery.parse(r) for r in raw[3:]]
        if deliveries:
            self.sink(deliveries)
        return deliveries

    async def sample(
        self, saturation: float, stale: int, endpoints: int, now: int | None = None
    ) -> list[Delivery]:
        """Writes a saturation sample (lua/sample.lua) and dispatches what it frees."""
        raw = await self._call(
            "sample", now, self.replica_id, repr(float(saturation)), stale, endpoints
        )
        return self._reply(raw).deliveries

    async def renew(self, item_id: str, lease_ms: int, now: int | None = None) -> bool:
        raw = await self._call("renew", now, item_id, lease_ms, self.replica_id)
        return int(raw[0]) == 1

    async def reregister(
        self,
        held: Sequence[tuple[str, str, int, int]],
        now: int | None = None,
        *,
        direct: bool = False,
    ) -> int:
        """Puts back slots this replica holds: (item id, escaped workload id, lease ms, tokens),
        lease 0 for its own slots, the remaining lease for tickets it issued."""
        flat = [str(x) for slot in held for x in slot]
        call = self.call_direct if direct else self._call
        raw = await call("reregister", now, self.replica_id, *flat)
        return int(raw[0])

    async def pool_time(self, now: int | None = None) -> int:
        """Pool-relative ms (the scripts' clock): ``now`` or Redis TIME, minus the pool's epoch."""
        try:
            epoch = await self.client.hget(self.key(contract.POOL), "epoch")
            if now is None:
                secs, micros = await self.client.time()
                now = int(secs) * 1000 + int(micros) // 1000
        except RedisError as exc:
            raise StoreError(f"time: {exc}") from exc
        return now - int(epoch or 0)

    async def pop_inbox(self, timeout_s: float) -> list[Delivery]:
        """Blocks up to ``timeout_s`` for wake-ups; one command takes all that are waiting."""
        key = self.key(contract.inbox_key(self.replica_id))
        try:
            # BLMPOP (Redis >= 7) blocks like BLPOP but returns up to COUNT entries at once.
            popped = await self.inbox_client.blmpop(
                timeout_s, 1, key, direction="LEFT", count=INBOX_BATCH
            )
        except RedisError as exc:
            raise StoreError(f"inbox: {exc}") from exc
        if popped is None:
            return []
        # Not through the sink: the controller checks its lease before using wake-ups that may
        # have waited in its socket while it was paused.
        return [Delivery.parse(raw) for raw in popped[1]]


def _no_config(raw: Sequence[Any]) -> bool:
    """The script's reply is { S_NO_CONFIG }. A batch's first element is an operation's reply
    (a list, one string: contract.OP_REPLY, or a release's status, never S_NO_CONFIG)."""
    return bool(raw) and type(raw[0]) is int and raw[0] == ScriptStatus.NO_CONFIG
