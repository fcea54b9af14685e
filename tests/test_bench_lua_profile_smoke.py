"""bench/lua_profile.py (Lua VM instructions per admission, by function and line, with the library
run under lupa and redis.call forwarded to a redis-server) runs end to end on this tree, with the
bench's own request mix and checks, so its code cannot rot."""

from __future__ import annotations

import pytest

from bench.lua_profile import profile
from tests.redis_proc import RedisProcess


@pytest.mark.redis
@pytest.mark.parametrize("kind", ["fast-batch", "queued"])
async def test_the_profile_counts_the_transitions_instructions(
    redis_server: RedisProcess, kind: str
) -> None:
    result = await profile(redis_server.url, kind, steps=1, warm_up=1)
    assert result.admissions == 64
    assert result.total() > 0
    functions = {result.function_name(line) for line in result.functions}
    assert any(name.startswith("local function op_enqueue(") for name in functions)
    # Every step releases as many slots as it admits, each release deleting its slot's record.
    assert result.commands["HDEL"] >= result.admissions
    assert result.c_calls  # string functions and the like, called by the library
    assert "op_enqueue" in result.report(top=40)
