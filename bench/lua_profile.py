"""Where the function library's Lua work goes: VM instructions per admission, by function and line.

callgrind (``bench/engine_compare.py --instructions``) counts what Redis executes, but Redis's Lua
is one stripped blob to it: it cannot say which Lua function or line the instructions ran for.
This runs the same library (``sidecar.store.scripts.library``) in Lua 5.1 under lupa (the
fakeredis dependency), with ``redis.call`` forwarded to a redis-server of its own, drives it with
the bench's own request mix (``bench.redis_bench.LoadDriver``, so the same operations and the
same checks as the Redis benches) and counts every Lua VM instruction with a count hook:

    python -m bench.lua_profile [--kind fast-batch] [--steps 10] [--top 25]

It prints, per admission: VM instructions by function (the line that defines it) and by line
(of the expanded library, ``sidecar.store.scripts.library()``), calls of C functions
(``string.sub``, ``string.match``, ...) and commands run through ``redis.call``. A VM
instruction is not a machine instruction: a C function or a Redis command counts as its one
call here, however much it costs inside (callgrind says that), and a Lua call costs far more
than a table lookup. The hook runs on every instruction, so this is slow; its counts are exact.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lupa.lua51 as lupa
import redis

from bench.redis_bench import LOAD_KINDS, LoadDriver, LoadSpec
from sidecar.store.scripts import library
from tests.redis_proc import RedisProcess

KINDS = tuple(k for k in LOAD_KINDS if k != "trivial")
BATCH = 64  # admissions per step, as in bench/engine_compare.py
LIBRARY_CHUNK = "=library"

# Redis's Lua API as the library uses it; calls go to Python (pycall). Lua numbers go to Redis
# as Redis formats them (integers without a fraction). cmsgpack.unpack, a C function in Redis,
# is one Python call here (msgpack_values), so it counts as one call, as it costs there.
_REDIS_API = b"""
local pycall, pysha1, pyunpack = ...
local REG = {}
redis = {}
cmsgpack = { unpack = pyunpack }
function redis.register_function(name, fn) REG[name] = fn end
function redis.call(...)
  local args = { ... }
  for i = 1, #args do
    local a = args[i]
    if type(a) == 'number' and a % 1 == 0 then a = string.format('%d', a) end
    args[i] = tostring(a)
  end
  local reply = pycall(args)
  if type(reply) == 'table' and reply.err then error(reply.err) end
  return reply
end
function redis.sha1hex(s) return pysha1(s) end
function redis.error_reply(msg) return { err = msg } end
function redis.status_reply(msg) return { ok = msg } end
return REG
"""

# Per instruction: the running function's defining line and its current line (only the library's
# chunk). Per call of a C function from the library: its name.
_HOOK = b"""
local lines, defined, cfuncs, chunk = {}, {}, {}, ...
local getinfo = debug.getinfo
local function hook(event)
  if event == 'count' then
    local i = getinfo(2, 'Sl')
    if i and i.source == chunk then
      lines[i.currentline] = (lines[i.currentline] or 0) + 1
      defined[i.linedefined] = (defined[i.linedefined] or 0) + 1
    end
  else
    local i, caller = getinfo(2, 'Sn'), getinfo(3, 'S')
    if i and i.what == 'C' and caller and caller.source == chunk then
      local name = i.name or '?'
      cfuncs[name] = (cfuncs[name] or 0) + 1
    end
  end
end
local function on() debug.sethook(hook, 'c', 1) end
local function off() debug.sethook() end
return on, off, lines, defined, cfuncs
"""


def _redis_reply_to_lua(lua: Any, value: Any) -> Any:
    """A Redis reply as Redis gives it to Lua: nil bulk -> false, array -> table."""
    if isinstance(value, list):
        return lua.table_from([_redis_reply_to_lua(lua, x) for x in value])
    if value is None:
        return False
    if isinstance(value, str):
        return value.encode()
    return value


def _lua_reply_to_python(value: Any) -> Any:
    """A script's Lua reply as a Redis client reads it: table -> list (to the first nil),
    number -> int, false -> None, { err } -> an error."""
    if value is None or value is False:
        return None
    if value is True:
        return 1
    if isinstance(value, float):
        return int(value)
    if isinstance(value, (bytes, int)):
        return value
    err = value[b"err"]
    if err is not None:
        raise redis.ResponseError(err.decode())
    out = []
    i = 1
    while value[i] is not None:
        out.append(_lua_reply_to_python(value[i]))
        i += 1
    return out


def msgpack_values(blob: bytes) -> tuple[int | bytes, ...]:
    """A MessagePack stream of integers and texts (contract.batch_ops), as cmsgpack.unpack
    returns it: every value (texts as bytes)."""
    values: list[int | bytes] = []
    at = 0
    while at < len(blob):
        t = blob[at]
        if t < 0x80 or t >= 0xE0:
            values.append(t if t < 0x80 else t - 0x100)
            at += 1
        elif 0xA0 <= t < 0xC0 or t in _TEXT_LENGTH_BYTES:
            k = _TEXT_LENGTH_BYTES.get(t, 0)
            n = t - 0xA0 if k == 0 else int.from_bytes(blob[at + 1 : at + 1 + k], "big")
            values.append(blob[at + 1 + k : at + 1 + k + n])
            at += 1 + k + n
        elif t in _INT_BYTES:
            k = _INT_BYTES[t]
            values.append(int.from_bytes(blob[at + 1 : at + 1 + k], "big", signed=t >= 0xD0))
            at += 1 + k
        else:
            raise ValueError(f"msgpack type {t:#x} is not one batch_ops writes")
    return tuple(values)


_INT_BYTES = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
_TEXT_LENGTH_BYTES = {0xD9: 1, 0xDA: 2, 0xDB: 4}


def _sha1(text: bytes) -> bytes:
    return hashlib.sha1(text).hexdigest().encode()


class InProcessLibrary:
    """What LoadDriver needs of a Redis client, with the scripts run in this process's Lua.

    ``function_load`` runs the library here; ``fcall`` (alone or in a pipeline) calls its
    function; every ``redis.call`` a script makes goes to ``server`` and is counted."""

    def __init__(self, server: redis.Redis) -> None:
        self._server = server
        self._lua = lupa.LuaRuntime(encoding=None, unpack_returned_tuples=True)
        self._functions: Any = None
        self.commands: Counter[str] = Counter()

    def _call(self, args: Any) -> Any:
        argv = [args[i] for i in range(1, len(args) + 1)]
        self.commands[argv[0].decode().upper()] += 1
        try:
            reply = self._server.execute_command(*argv)  # type: ignore[no-untyped-call]
        except redis.ResponseError as exc:
            return self._lua.table_from({b"err": str(exc).encode()})
        return _redis_reply_to_lua(self._lua, reply)

    def load(self, source: str) -> None:
        self._functions = self._lua.execute(_REDIS_API, self._call, _sha1, msgpack_values)
        # Without the '#!lua name=...' line Redis reads first.
        body = source.split("\n", 1)[1]
        chunk = self._lua.globals().loadstring(body.encode(), LIBRARY_CHUNK.encode())
        if chunk is None:
            raise RuntimeError("the library does not compile under Lua 5.1")
        chunk()

    def counting_hook(self) -> tuple[Any, Any, Any, Any, Any]:
        """Lua functions that start and stop counting, and the tables they count into."""
        hooks: tuple[Any, Any, Any, Any, Any] = self._lua.execute(_HOOK, LIBRARY_CHUNK.encode())
        return hooks

    def run(self, name: str, keys: Sequence[Any], argv: Sequence[Any]) -> Any:
        function = self._functions[name.encode()]
        if function is None:
            raise redis.ResponseError(f"Function not found: {name}")
        as_lua = [x if isinstance(x, bytes) else str(x).encode() for x in (*keys, *argv)]
        lua_keys = self._lua.table_from(as_lua[: len(keys)])
        lua_argv = self._lua.table_from(as_lua[len(keys) :])
        return _lua_reply_to_python(function(lua_keys, lua_argv))

    # The redis-py asyncio client's methods LoadDriver calls ----------------------------------

    async def function_load(self, source: str, replace: bool = False) -> str:
        self.load(source)
        return source.split()[1].removeprefix("name=")

    async def script_load(self, source: str) -> str:
        return hashlib.sha1(source.encode()).hexdigest()

    async def fcall(self, name: str, numkeys: int, *args: Any) -> Any:
        return self.run(name, args[:numkeys], args[numkeys:])

    def pipeline(self, transaction: bool = False) -> Pipeline:
        return Pipeline(self)


@dataclass
class Pipeline:
    library: InProcessLibrary
    calls: list[tuple[str, int, tuple[Any, ...]]] = field(default_factory=list)

    def fcall(self, name: str, numkeys: int, *args: Any) -> Pipeline:
        self.calls.append((name, numkeys, args))
        return self

    async def execute(self) -> list[Any]:
        done = [await self.library.fcall(name, n, *args) for name, n, args in self.calls]
        self.calls = []
        return done


@dataclass
class Profile:
    admissions: int
    lines: dict[int, int]  # library line -> VM instructions
    functions: dict[int, int]  # line a function is defined on -> VM instructions
    c_calls: dict[str, int]
    commands: dict[str, int]
    source: list[str]  # the library's lines (as loaded: without its first)

    def per_admission(self, n: int) -> float:
        return n / self.admissions

    def total(self) -> float:
        return self.per_admission(sum(self.lines.values()))

    def function_name(self, line: int) -> str:
        if line == 0:
            return "(a script's body)"
        return self.source[line - 1].strip()

    def report(self, top: int) -> str:
        out = [f"Lua VM instructions per admission: {self.total():.0f}", ""]
        out.append("by function (the line defining it):")
        for line, n in sorted(self.functions.items(), key=lambda x: -x[1])[:top]:
            out.append(
                f"  {self.per_admission(n):8.1f}  {line:5d}  {self.function_name(line)[:90]}"
            )
        out += ["", "by line:"]
        for line, n in sorted(self.lines.items(), key=lambda x: -x[1])[:top]:
            text = self.source[line - 1].strip()[:90]
            out.append(f"  {self.per_admission(n):8.1f}  {line:5d}  {text}")
        out += ["", "calls of C functions:"]
        for name, n in sorted(self.c_calls.items(), key=lambda x: -x[1])[:top]:
            out.append(f"  {self.per_admission(n):8.2f}  {name}")
        out += ["", "redis.call, by command:"]
        for name, n in sorted(self.commands.items(), key=lambda x: -x[1]):
            out.append(f"  {self.per_admission(n):8.3f}  {name}")
        return "\n".join(out)


async def profile(url: str, kind: str, steps: int, warm_up: int = 3) -> Profile:
    """``steps`` steps of ``kind`` (bench.redis_bench.LOAD_KINDS), after ``warm_up`` uncounted."""
    # RESP2, without redis-py's reply callbacks: replies as a script sees them.
    server = redis.Redis.from_url(url, protocol=2)
    server.response_callbacks.clear()
    try:
        lua = InProcessLibrary(server)
        driver = LoadDriver(lua, LoadSpec("", kind, f"profile-{kind}", "profile-0", BATCH, 0))
        await driver.prepare()
        for _ in range(warm_up):
            await driver.step()
        on, off, lines, defined, c_calls = lua.counting_hook()
        lua.commands.clear()
        made = driver.made
        on()
        try:
            for _ in range(steps):
                await driver.step()
        finally:
            off()
        return Profile(
            admissions=driver.made - made,
            lines=_counts(lines),
            functions=_counts(defined),
            c_calls={k.decode(): v for k, v in _counts(c_calls).items()},
            commands=dict(lua.commands),
            source=library()[1].split("\n", 1)[1].splitlines(),
        )
    finally:
        server.close()


def _counts(table: Any) -> dict[Any, int]:
    return {(k if isinstance(k, bytes) else int(k)): int(v) for k, v in table.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=KINDS, default="fast-batch")
    parser.add_argument("--steps", type=int, default=10, help="counted steps of 64 admissions")
    parser.add_argument("--top", type=int, default=25, help="rows per table")
    args = parser.parse_args(argv)
    server = RedisProcess().start()
    try:
        result = asyncio.run(profile(server.url, args.kind, args.steps))
    finally:
        server.stop()
    print(result.report(args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
