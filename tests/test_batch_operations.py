"""batch.lua's operations argument (contract.batch_ops, lua/includes/operations.lua): one
MessagePack stream, decoded by Redis's cmsgpack or, where a Lua has none (fakeredis), in Lua;
both decode it alike, and an argument that is not one changes nothing."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import contract
from sidecar.contract import ScriptStatus
from sidecar.store.scripts import _read_include, contract_lua, expand_includes
from tests.conftest import Backend, make_config
from tests.redis_proc import RedisProcess

TTL = 60_000

# Each value as text with its type, so numbers cross without Redis's integer reply truncating
# them: 'n<%.17g>' or 's<text>'.
# (set_prefix first, as every call does: it takes the library's standard functions.)
_BOTH_DECODERS = """
set_prefix('t:')
local function shown(values)
  if not values then return false end
  local out = {}
  for i, v in ipairs(values) do
    if type(v) == 'number' then out[i] = 'n' .. string.format('%.17g', v) else out[i] = 's' .. v end
  end
  return out
end
return { shown(decode_operations(ARGV[1], false)), shown(decode_operations(ARGV[1], true)) }
"""


def _script() -> str:
    sources = {"contract": contract_lua(), "operations": _include("operations")}
    return expand_includes(
        "t.lua", "-- @include contract\n-- @include operations\n" + _BOTH_DECODERS, sources.get
    )


def _include(name: str) -> str:
    text = _read_include(name)
    assert text is not None
    return text


def _shown(value: object) -> bytes:
    if isinstance(value, int):
        return b"n" + str(value).encode()
    assert isinstance(value, str)
    return b"s" + value.encode()


values = st.lists(
    st.one_of(
        st.integers(min_value=-(2**31), max_value=2**53),
        st.text(max_size=300),
        st.sampled_from(["", "e", "h", "0", "-3", "tenant-007"]),
    ),
    max_size=40,
)


@pytest.mark.redis
@settings(max_examples=200, deadline=None)
@given(values=values)
def test_cmsgpack_and_the_lua_decoder_read_the_same_values(
    redis_server: RedisProcess, values: list[Any]
) -> None:
    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis_server.url)
    try:
        blob = contract.msgpack_stream(values)
        by_cmsgpack, in_lua = client.eval(_script(), 0, blob)
    finally:
        client.close()
    assert by_cmsgpack == in_lua == [_shown(v) for v in values]


@pytest.mark.redis
async def test_a_stream_cut_short_or_of_a_type_batch_ops_never_writes_decodes_to_nothing(
    redis_server: RedisProcess,
) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        whole = contract.msgpack_stream(["e", "tenant", 70000])
        for blob in (whole[:-1], whole[:3], b"\xc1", b"\xc4\x01x"):
            by_cmsgpack, in_lua = await client.eval(_script(), 0, blob)
            assert (by_cmsgpack, in_lua) == (None, None), blob
    finally:
        await client.aclose()


def test_batch_ops_writes_each_field_as_its_record_says() -> None:
    blob = contract.batch_ops(
        [(contract.OP_ENQUEUE, [0, "f", "w", "3", 10, TTL, 0, "7", 0]), (contract.OP_RELEASE, [5])]
    )
    assert blob == contract.msgpack_stream(["e", "0", "f", "w", 3, 10, TTL, 0, 7, 0, "r", "5"])
    with pytest.raises(ValueError, match="op_release"):
        contract.batch_ops([(contract.OP_RELEASE, ["1", "2"])])


async def _pool_state(backend: Backend, store: Any) -> dict[bytes, bytes]:
    state: dict[bytes, bytes] = await store.client.hgetall(store.key(contract.POOL))
    return state


async def test_operations_that_do_not_decode_change_nothing(backend: Backend) -> None:
    store = backend.store(make_config(limit=10))
    await store.configure(now=0)
    before = await _pool_state(backend, store)
    with pytest.raises(Exception, match="not a MessagePack stream"):
        await store.call_direct("batch", 1, "r1", b"\xc1")
    assert await _pool_state(backend, store) == before


async def test_an_unknown_or_cut_short_operation_stops_the_call_after_what_ran(
    backend: Backend,
) -> None:
    store = backend.store(make_config(limit=10))
    await store.configure(now=0)
    enqueue = [0, "f", "w", 3, 10, TTL, 0, 0, 0]
    whole = contract.batch_ops([(contract.OP_ENQUEUE, enqueue)])
    for tail in (contract.msgpack_stream(["x", "1"]), contract.msgpack_stream(["r"])):
        with pytest.raises(Exception, match="unknown or cut short operation"):
            await store.call_direct("batch", 1, "r1", whole + tail)
    # The enqueue before each bad operation ran, and was written.
    pool = await _pool_state(backend, store)
    assert int(pool[b"inflight"]) == 2
    raw = await store.call_direct("batch", 2, "r1", whole + whole)
    assert [contract.OP_REPLY.parse(r.decode())["status"] for r in raw] == [
        str(int(ScriptStatus.DISPATCHED))
    ] * 2
