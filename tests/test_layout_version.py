"""Two sidecar versions with different Redis layouts (contract.LAYOUT_VERSION) never share a
pool: configure.lua refuses a pool whose layout note (contract.POOL_LAYOUT) names another
layout, every other script finds no configuration there, and the replica says why
(LayoutMismatchError) instead of recovering, so neither version reads or changes what the other
wrote. A pool written before the note named a version is layout 2, another layout too."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from redis.asyncio import Redis

from sidecar import contract
from sidecar.errors import LayoutMismatchError
from sidecar.keys import pool_prefix
from sidecar.outcome import ScriptStatus
from sidecar.store import PoolStore
from tests.conftest import Backend, make_config
from tests.http_harness import eventually, running_stack

TTL = 60_000
FOREIGN_NOTE = (
    "layout 99, hashtable: this value is longer than hash-max-listpack-value, so each field is "
    "found without a scan"
)


async def enq(store: PoolStore, now: int) -> Any:
    return await store.enqueue(
        now=now, band=0, flow="f", workload="w", criticality=3, byte_size=10, ttl_ms=TTL
    )


def digest(pool: dict[str, str]) -> str:
    """The configuration digest as includes/config.lua computes it: the settings, the band
    records and the layout note, sorted, one 'field=value' per line."""
    parts = sorted(
        f"{field}={value}"
        for field, value in pool.items()
        if field in contract.CFG_FIELDS
        or field == contract.POOL_LAYOUT
        or field.startswith(contract.CFG_BAND)
    )
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()


async def pool_hash(store: PoolStore) -> dict[str, str]:
    raw = await store.client.hgetall(store.key(contract.POOL))
    return {k.decode(): v.decode() for k, v in raw.items()}


async def everything(store: PoolStore) -> dict[str, Any]:
    """Every key of the pool with its type and contents."""
    out: dict[str, Any] = {}
    for key in sorted(await store.client.keys(store.prefix + "*")):
        kind = (await store.client.type(key)).decode()
        if kind == "hash":
            out[key.decode()] = await store.client.hgetall(key)
        elif kind == "list":
            out[key.decode()] = await store.client.lrange(key, 0, -1)
        elif kind == "zset":
            out[key.decode()] = await store.client.zrange(key, 0, -1, withscores=True)
        else:
            out[key.decode()] = kind
    return out


async def rewrite_as_another_layout(
    store: PoolStore, pool: dict[str, str], note: str = FOREIGN_NOTE
) -> None:
    """The pool as a sidecar of another layout makes it after Redis lost the data: the same
    settings and epoch, its own layout note, and the digest of those; not this library's write
    stamp (contract.POOL_STAMP), which only this library writes."""
    await store.client.flushall()
    foreign = {**pool, contract.POOL_LAYOUT: note}
    del foreign[contract.POOL_STAMP]
    foreign[contract.CFG_DIGEST] = digest(foreign)
    await store.client.hset(store.key(contract.POOL), mapping=foreign)


def test_python_reads_the_layout_note_as_the_scripts_do() -> None:
    """contract.layout_is_ours (/readyz) is the twin of includes/config.lua foreign_layout: the
    tests below take each of these notes through the scripts."""
    assert contract.layout_is_ours(None)
    assert contract.layout_is_ours(contract.POOL_LAYOUT_NOTE)
    assert not contract.layout_is_ours(contract.POOL_LAYOUT_NOTE_UNVERSIONED)
    assert not contract.layout_is_ours(FOREIGN_NOTE)
    assert contract.POOL_LAYOUT_NOTE.startswith(f"layout {contract.LAYOUT_VERSION},")
    assert contract.layout_named(contract.POOL_LAYOUT_NOTE_UNVERSIONED) == "layout 2"
    assert contract.layout_named(FOREIGN_NOTE) == "layout 99"


async def test_the_digest_covers_the_layout_note(backend: Backend) -> None:
    store = backend.store(make_config(limit=1))
    await store.configure(now=0)
    pool = await pool_hash(store)
    assert pool[contract.POOL_LAYOUT] == contract.POOL_LAYOUT_NOTE
    assert pool[contract.CFG_DIGEST] == digest(pool)
    without_note = {k: v for k, v in pool.items() if k != contract.POOL_LAYOUT}
    assert digest(without_note) != pool[contract.CFG_DIGEST]


async def test_a_pool_made_again_in_another_layout_is_neither_read_nor_changed(
    backend: Backend,
) -> None:
    store = backend.store(make_config(limit=1))
    await store.configure(now=0)
    held = await enq(store, 10)
    assert held.status is ScriptStatus.DISPATCHED
    assert (await enq(store, 11)).status is ScriptStatus.QUEUED  # its configuration is cached
    await rewrite_as_another_layout(store, await pool_hash(store))
    before = await everything(store)
    lost: list[int | None] = []

    async def on_lost(now: int | None) -> None:
        lost.append(now)

    store.on_lost = on_lost
    # The hot path (a cached configuration, the same settings and epoch), the other scripts,
    # and configure itself: each refuses, and nothing is recovered.
    for call in (
        enq(store, 12),
        store.release(held.item_id, now=13),
        store.heartbeat(1000, now=14),
        store.maintain(1000, now=15),
        store.configure(now=16),
        backend.store(make_config(limit=1), "r2").configure(now=17),
    ):
        with pytest.raises(LayoutMismatchError, match="layout 99"):
            await call
    assert lost == []
    assert await everything(store) == before


async def test_a_pool_written_before_layout_versions_is_refused_as_layout_2(
    backend: Backend,
) -> None:
    """Sidecars up to 1b7bfd2 wrote the note without a version, in layout 2: no write stamp and
    a workload's counters field by field, so this layout cannot share their pools."""
    store = backend.store(make_config(limit=1))
    await store.configure(now=0)
    held = await enq(store, 10)
    pool = await pool_hash(store)
    # As such a sidecar leaves the pool after Redis lost the data: the note and the digest
    # without a version.
    await rewrite_as_another_layout(store, pool, contract.POOL_LAYOUT_NOTE_UNVERSIONED)
    before = await everything(store)
    for call in (
        enq(store, 11),
        store.release(held.item_id, now=12),
        store.configure(now=13),
        backend.store(make_config(limit=2), "r2").configure(now=14),
    ):
        with pytest.raises(LayoutMismatchError, match="layout 2"):
            await call
    assert await everything(store) == before


@pytest.mark.redis
async def test_a_replica_is_not_ready_on_a_pool_in_another_layout_until_it_is_gone(
    redis_server: Any,
) -> None:
    """A new version deployed next to an old one with another layout never becomes ready (so a
    rolling upgrade stops there), answers requests as with Redis down, and leaves the pool as it
    is; once the pool's keys are deleted (docs/upgrading.md) it configures its own and is ready."""
    client = Redis.from_url(redis_server.url)
    try:
        await client.flushall()
        key = pool_prefix("default") + contract.POOL
        await client.hset(
            key, mapping={"epoch": "0", contract.POOL_LAYOUT: FOREIGN_NOTE, "cfgv": "x"}
        )
        before = await client.hgetall(key)
        async with running_stack(make_config(limit=2), redis_url=redis_server.url) as stack:
            async with stack.session.get(f"{stack.admin}/readyz") as r:
                assert r.status == 503
                assert "layout 99" in await r.text()
            async with stack.session.get(f"{stack.data}/v1/x") as r:
                assert r.status == 503
            assert await client.hgetall(key) == before
            await client.delete(key)

            async def ready() -> bool:
                async with stack.session.get(f"{stack.admin}/readyz") as r:
                    return r.status == 200

            await eventually(ready)
            note = await client.hget(key, contract.POOL_LAYOUT)
            assert note == contract.POOL_LAYOUT_NOTE.encode()
            async with stack.session.get(f"{stack.data}/v1/x") as r:
                assert r.status == 200
    finally:
        await client.aclose()
