"""Runs one history of operations on the Lua scripts and on tests/reference_model.py, comparing
every reply, every wake-up in every replica's inbox, and (at each maintenance tick) the counters.

Operations are tuples, so hypothesis prints and shrinks them readably (dt = ms since the previous
operation; `rep` indexes REPLICAS; `pick` chooses among the ids the history knows):
    ("e", dt, rep, band, flow, workload, criticality, bytes, ttl_ms, lease_ms, tokens, slo_ms)
    ("r", dt, pick)                            release a slot the test holds (by its owner)
    ("c", dt, pick, reason)                    cancel / expire any item seen so far (by its owner)
    ("m", dt, rep, budget)                     a replica's maintenance tick (interval-gated)
    ("d", dt, rep, lease_ms)                   heartbeat with a short lease: the replica dies
    ("h", dt, rep)                             heartbeat with a long lease: alive again
    ("n", dt, pick, lease_ms)                  renew the lease of a slot the test holds
    ("b", dt, rep, [("e", band, ...) | ("r", pick), ...])   several operations in one batch.lua
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sidecar import contract
from sidecar.config import Config
from sidecar.outcome import ScriptStatus
from sidecar.registry import METRIC_FIELDS, counters_from_hash
from sidecar.store import PoolStore
from sidecar.store.pool import Delivery, ScriptReply
from tests.conftest import Backend
from tests.reference_model import Event, PoolModel, Reply, item_id

REPLICAS = ("r1", "r2", "r3")
WORKLOADS = ("", "alpha", "beta", "gamma", "delta")
LONG_LEASE_MS = 3_600_000
MAINTENANCE_INTERVAL_MS = 1000
START_MS = 10_000

Seen = tuple[int, str, str, list[tuple[str, int, int]]]


def _delivered(events: list[Event]) -> list[tuple[str, int, int]]:
    return [(e.item_id, int(e.status), e.wait_ms) for e in events]


def _observed(reply: ScriptReply) -> Seen:
    return (
        int(reply.status),
        reply.item_id,
        reply.detail,
        [(d.item_id, int(d.status), d.wait_ms) for d in reply.deliveries],
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _script_reply(raw: list[Any] | bytes | int, item_id: str) -> ScriptReply:
    if isinstance(raw, int):  # a batch release's reply with no outcomes: its status alone
        return ScriptReply(ScriptStatus(raw), item_id, "", [])
    if isinstance(raw, bytes):  # a batch operation's reply with no outcomes: contract.OP_REPLY
        fields = contract.OP_REPLY.parse(raw.decode())
        return ScriptReply(ScriptStatus(int(fields["status"])), fields["a"], fields["b"], [])
    deliveries = [Delivery.parse(r) for r in raw[3:]]
    return ScriptReply(ScriptStatus(int(raw[0])), _text(raw[1]), _text(raw[2]), deliveries)


@dataclass
class Run:
    """One history in progress: the stores (one per replica), the model, and what the test knows."""

    backend: Backend
    config: Config
    stores: dict[str, PoolStore]
    model: PoolModel
    now: int = START_MS
    # Slots dispatched and not yet released by the test (reclaimed or expired ones stay here:
    # releasing them must answer 'not found' on both sides).
    held: list[str] = field(default_factory=list)
    owner: dict[str, str] = field(default_factory=dict)
    # What each item was enqueued with, as its replica would name it in a release of the slot it
    # holds (contract.BATCH_RELEASE_HELD): escaped workload id, tokens.
    account: dict[str, tuple[str, int]] = field(default_factory=dict)
    dispatch_order: list[str] = field(default_factory=list)
    step: int = 0
    op: object = None

    @property
    def where(self) -> str:
        return f"step {self.step} {self.op}"

    async def compare_call(
        self, caller: str, seen: list[Seen], expected: list[tuple[Reply, list[Event]]]
    ) -> None:
        """Checks the replies (the caller's outcomes in them) and every other replica's inbox."""
        want = [
            (int(r.status), r.item_id, r.detail, _delivered([e for e in ev if e.owner == caller]))
            for r, ev in expected
        ]
        assert seen == want, f"{self.where}: replies differ (lua, model)"
        events = [e for _, ev in expected for e in ev]
        inboxes = await self.read_inboxes()
        for replica in REPLICAS:
            if replica != caller:
                mine = _delivered([e for e in events if e.owner == replica])
                assert inboxes[replica] == mine, f"{self.where}: inbox of {replica} differs"
        for e in events:
            if e.status == ScriptStatus.DISPATCHED:
                self._dispatched(e.item_id)

    def _dispatched(self, iid: str) -> None:
        self.held.append(iid)
        self.dispatch_order.append(iid)

    async def read_inboxes(self) -> dict[str, list[tuple[str, int, int]]]:
        store = self.stores[REPLICAS[0]]
        pipe = store.client.pipeline(transaction=False)
        for replica in REPLICAS:
            pipe.lrange(store.key(f"inbox:{replica}"), 0, -1)
            pipe.delete(store.key(f"inbox:{replica}"))
        raw = await pipe.execute()
        out = {}
        for i, replica in enumerate(REPLICAS):
            ds = [Delivery.parse(m) for m in raw[2 * i]]
            out[replica] = [(d.item_id, int(d.status), d.wait_ms) for d in ds]
        return out

    async def compare_counters(self) -> None:
        """The pool's counts and every workload's registry entry, field by field."""
        store = self.stores[REPLICAS[0]]
        pipe = store.client.pipeline(transaction=False)
        pipe.hmget(store.key("pool"), "qn", "qbytes", "inflight", "seq")
        for wid in WORKLOADS:
            pipe.hmget(store.key("w:" + wid if wid else "anon"), *METRIC_FIELDS)
        raw = await pipe.execute()
        m = self.model
        stats = [int(x or 0) for x in raw[0]]
        want_stats = [len(m.queued), sum(i.size for i in m.queued.values()), len(m.inflight), m.seq]
        assert stats == want_stats, f"{self.where}: pool counts differ"
        for wid, fields in zip(WORKLOADS, raw[1:], strict=True):
            got = counters_from_hash(fields)
            lua = (got.bucket, got.current, got.previous, got.ema, got.dispatched, got.active)
            k = m.workloads.get(wid)
            want = (None, 0, 0, None, 0, 0) if k is None else (
                k.bucket, k.current, k.previous, k.ema, k.dispatched, k.active)  # fmt: skip
            assert lua == want, f"{self.where}: registry entry of {wid!r} differs"

    # Operations ---------------------------------------------------------------------------------
    async def enqueue(self, caller: str, args: tuple[Any, ...]) -> None:
        band, flow, wid, crit, size, ttl, lease, tokens, slo = args
        reply = await self.stores[caller].enqueue(
            band=band, flow=flow, workload=wid, criticality=crit, byte_size=size, ttl_ms=ttl,
            lease_ms=lease, tokens=tokens, slo_ms=slo, now=self.now,
        )  # fmt: skip
        expected = self.model.enqueue(self.now, caller, *args)
        self._own(caller, expected[0], args)
        await self.compare_call(caller, [_observed(reply)], [expected])

    def _own(self, caller: str, reply: Reply, args: tuple[Any, ...]) -> None:
        """Notes who owns a new item and what it was enqueued with; one dispatched in its own
        enqueue is held at once."""
        if reply.item_id:
            self.owner[reply.item_id] = caller
            self.account[reply.item_id] = (args[2], args[7])
        if reply.status == ScriptStatus.DISPATCHED:
            self._dispatched(reply.item_id)

    async def release(self, pick: int) -> None:
        if not self.held:
            return
        iid = self.held.pop(pick % len(self.held))
        caller = self.owner[iid]
        # Every other release names the slot's workload and tokens, as a replica does for a slot
        # it holds (the pool then does not read the slot's record).
        held = self.account[iid] if pick % 2 == 0 else None
        reply = await self.stores[caller].release(iid, now=self.now, held=held)
        await self.compare_call(
            caller, [_observed(reply)], [self.model.release(self.now, caller, iid)]
        )

    async def cancel(self, pick: int, reason: int) -> None:
        if not self.model.seq:
            return
        iid = item_id(pick % self.model.seq + 1)
        caller = self.owner[iid]
        reply = await self.stores[caller].cancel(iid, ScriptStatus(reason), now=self.now)
        expected = self.model.cancel(self.now, caller, iid, reason)
        if expected[0].detail == "released":
            self.held.remove(iid)
        await self.compare_call(caller, [_observed(reply)], [expected])

    async def maintain(self, caller: str, budget: int, *, force: bool) -> None:
        # A dead replica's items are popped in random order: never fewer than it owns.
        budget = max(budget, self.model.reclaim_size(self.now))
        raw = await self.stores[caller].call_direct(
            "maintain", self.now, caller, MAINTENANCE_INTERVAL_MS, budget, "1" if force else "0"
        )
        done, out = self.model.maintain(self.now, caller, MAINTENANCE_INTERVAL_MS, budget, force)
        counts = [int(x) for x in raw[:3]]
        assert counts == [int(done.ran), done.evicted, done.reclaimed], f"{self.where}: maintain"
        seen = [
            (
                0,
                "",
                "",
                [(d.item_id, int(d.status), d.wait_ms) for d in map(Delivery.parse, raw[3:])],
            )
        ]
        await self.compare_call(caller, seen, [(Reply(0, "", ""), out)])

    async def heartbeat(self, replica: str, lease: int) -> None:
        beat = await self.stores[replica].heartbeat(lease, now=self.now)
        assert beat.known == self.model.heartbeat(self.now, replica, lease), f"{self.where}"

    async def renew(self, pick: int, lease: int) -> None:
        if not self.held:
            return
        iid = self.held[pick % len(self.held)]
        renewed = await self.stores[self.owner[iid]].renew(iid, lease, now=self.now)
        assert renewed == self.model.renew(self.now, iid, lease), f"{self.where}: renew"

    async def batch(self, caller: str, subops: list[tuple[Any, ...]]) -> None:
        flat: list[tuple[str, list[Any]]] = []
        expected = []
        released: list[str] = []  # each operation's item id ('' for an enqueue)
        for sub in subops:
            if sub[0] == "e":
                flat.append((contract.OP_ENQUEUE, list(sub[1:])))
                released.append("")
                expected.append(self.model.enqueue(self.now, caller, *sub[1:]))
                self._own(caller, expected[-1][0], sub[1:])
                continue
            mine = [i for i in self.held if self.owner[i] == caller]
            if mine:
                iid = mine[sub[1] % len(mine)]
                self.held.remove(iid)
                if sub[1] % 2 == 0:
                    wid, tokens = self.account[iid]
                    flat.append((contract.OP_RELEASE_HELD, [iid, tokens, wid]))
                else:
                    flat.append((contract.OP_RELEASE, [iid]))
                expected.append(self.model.release(self.now, caller, iid))
                released.append(iid)
        if not flat:
            return
        ops = contract.batch_ops(flat)
        raw = await self.stores[caller].call_direct("batch", self.now, caller, ops)
        seen = [_observed(_script_reply(r, iid)) for r, iid in zip(raw, released, strict=True)]
        await self.compare_call(caller, seen, expected)

    async def apply(self, op: tuple[Any, ...]) -> None:
        kind, dt, *rest = op
        self.now += dt
        if kind == "e":
            await self.enqueue(REPLICAS[rest[0]], tuple(rest[1:]))
        elif kind == "r":
            await self.release(rest[0])
        elif kind == "c":
            await self.cancel(rest[0], rest[1])
        elif kind == "m":
            await self.maintain(REPLICAS[rest[0]], rest[1], force=False)
        elif kind == "d":
            await self.heartbeat(REPLICAS[rest[0]], rest[1])
        elif kind == "h":
            await self.heartbeat(REPLICAS[rest[0]], LONG_LEASE_MS)
        elif kind == "n":
            await self.renew(rest[0], rest[1])
        else:
            await self.batch(REPLICAS[rest[0]], rest[1])

    async def drain(self, every: int) -> None:
        """Releases every held slot, with the same maintenance ticks, until the pool is empty."""
        for i in range(4 * self.model.seq + 20):
            if not self.model.queued and not self.model.inflight:
                return
            self.step += 1
            # Past the recovery hold at once: waiting it out in small steps proves nothing more.
            self.now = max(self.now + 500, self.model.hold)
            if self.held and i % every != every - 1:
                await self.release(0)
            else:
                await self.maintain(REPLICAS[0], 500, force=True)
        raise AssertionError("the pool did not drain")


async def start_run(backend: Backend, config: Config, hold_ms: int) -> Run:
    await backend.client().flushall()
    stores = {r: backend.store(config, r) for r in REPLICAS}
    await stores[REPLICAS[0]].configure(now=0, recovering=hold_ms > 0)
    model = PoolModel(config, hold=hold_ms)
    run = Run(backend, config, stores, model)
    for replica in REPLICAS:
        await run.heartbeat(replica, LONG_LEASE_MS)
    return run


async def run_history(
    backend: Backend,
    config: Config,
    hold_ms: int,
    ops: list[tuple[Any, ...]],
    every: tuple[int, int],
) -> Run:
    """Runs ``ops`` with a forced maintenance tick before every ``every[0]``-th one, then drains
    with a tick every ``every[1]`` steps (rarely, so incremental re-ranks decide dispatch there,
    or often, so the ticks' re-ranks do)."""
    run = await start_run(backend, config, hold_ms)
    for i, op in enumerate(ops):
        if i % every[0] == every[0] - 1:
            run.step, run.op = i, "(the forced tick before it)"
            await run.maintain(REPLICAS[0], 500, force=True)
            await run.compare_counters()
        run.step, run.op = i, op
        await run.apply(op)
    run.step, run.op = len(ops), "drain"
    await run.drain(every[1])
    await run.compare_counters()
    return run
