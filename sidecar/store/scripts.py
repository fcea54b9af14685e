"""Reads the Lua scripts shipped with the package and registers each once with redis-py.

A script or an include pulls another include in with a line ``-- @include <name>``: the loader
puts each include's text in place of its first ``@include`` line (depth first, so what an include
needs comes before it), drops later duplicates and refuses cycles, naming the line that closes
one. Includes live in ``lua/includes/``, except ``contract``, which is generated from
sidecar/contract.py. redis-py's Script object handles SCRIPT LOAD, EVALSHA and NOSCRIPT.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from sidecar import contract

_INCLUDE = re.compile(r"^-- @include (\w+)[ \t]*$")
CONTRACT_INCLUDE = "contract"
SCRIPT_NAMES = (
    "configure",
    "sample",
    "enqueue",
    "release",
    "cancel",
    "heartbeat",
    "maintain",
    "renew",
    "reregister",
    "reconcile",
    "batch",
)


class IncludeError(ValueError):
    """A missing include or an include cycle; the message names the file and line."""


def _lua_dir() -> Path:
    packaged = resources.files("sidecar") / "lua"
    if packaged.is_dir():
        return Path(str(packaged))
    # A source checkout: lua/ sits beside the package (it is copied into the wheel when built).
    return Path(__file__).resolve().parents[2] / "lua"


def expand_includes(name: str, text: str, read_include: Callable[[str], str | None]) -> str:
    """``text`` (the file ``name``) with its includes expanded; ``read_include`` returns an
    include's source, or None when there is none of that name."""
    done: set[str] = set()

    def expand(unit: str, source: str, stack: tuple[str, ...]) -> str:
        out: list[str] = []
        for lineno, line in enumerate(source.splitlines(keepends=True), 1):
            match = _INCLUDE.match(line.rstrip("\r\n"))
            if match is None:
                out.append(line)
                continue
            dep = match.group(1)
            if dep in stack:
                chain = " -> ".join((*stack, dep))
                raise IncludeError(f"{unit}:{lineno}: include cycle {chain}: {line.strip()}")
            if dep in done:
                continue
            dep_source = read_include(dep)
            if dep_source is None:
                raise IncludeError(f"{unit}:{lineno}: no include named {dep!r}: {line.strip()}")
            expanded = expand(f"includes/{dep}.lua", dep_source, (*stack, dep))
            out.append(expanded if expanded.endswith("\n") else expanded + "\n")
            done.add(dep)
        return "".join(out)

    return expand(name, text, (name,))


def _read_include(name: str) -> str | None:
    if name == CONTRACT_INCLUDE:
        return contract_lua()
    path = _lua_dir() / "includes" / f"{name}.lua"
    return path.read_text() if path.is_file() else None


_INIT = re.compile(r"^\s*(?:local )?function (init_\w+)\(\)", re.M)


def _split_script(name: str) -> tuple[str, str]:
    """A script's header and include lines, and its body (what follows the last include)."""
    lines = (_lua_dir() / f"{name}.lua").read_text().splitlines(keepends=True)
    last = max(i for i, line in enumerate(lines) if _INCLUDE.match(line.rstrip("\r\n")))
    return "".join(lines[: last + 1]), "".join(lines[last + 1 :])


def _begin_call(expanded: str) -> str:
    """``begin_call(prefix)``: every call runs it first, to set the keys of its pool and the
    per-call state of each include that keeps some (its ``init_<include>``)."""
    inits = "".join(f"  {init}()\n" for init in _INIT.findall(expanded))
    return f"local function begin_call(p)\n  set_prefix(p)\n{inits}end\n"


@cache
def script_source(name: str) -> str:
    """A script for EVAL: its includes expanded in place, then its body."""
    head, body = _split_script(name)
    expanded = expand_includes(f"{name}.lua", head, _read_include)
    return f"{expanded}{_begin_call(expanded)}begin_call(KEYS[1])\n{body}"


@cache
def library() -> tuple[str, str]:
    """The function library with every script (FUNCTION LOAD once, then FCALL): its name and
    source. Each script becomes the function ``<library>_<script>``; the library's name holds a
    hash of its source, so replicas of different versions can share a Redis.

    Every include's top level is one Lua chunk, and Lua 5.1 allows a function 200 locals: the
    library is near that, so an include keeps private helpers and tables inside a ``do`` block
    (as the contract's ``int``/``tonum`` and ``item_key`` do) rather than adding top-level ones."""
    parts = [_split_script(name) for name in SCRIPT_NAMES]
    heads = "".join(
        line
        for head, _ in parts
        for line in head.splitlines(keepends=True)
        if _INCLUDE.match(line.rstrip("\r\n"))
    )
    expanded = expand_includes("library", heads, _read_include)
    units = [expanded, _begin_call(expanded)]
    for name, (_, body) in zip(SCRIPT_NAMES, parts, strict=True):
        units.append(
            f"redis.register_function('%(lib)s_{name}', function(KEYS, ARGV)\n"
            f"begin_call(KEYS[1])\n{body}end)\n"
        )
    code = "".join(units)
    lib = "admission_sidecar_" + hashlib.sha1(code.encode()).hexdigest()[:12]
    return lib, f"#!lua name={lib}\n" + code.replace("%(lib)s", lib)


def function_name(script: str) -> str:
    return f"{library()[0]}_{script}"


def load_scripts(client: Any) -> dict[str, Any]:
    """Register every script on a redis-py (or fakeredis) asyncio client."""
    return {name: client.register_script(script_source(name)) for name in SCRIPT_NAMES}


# --- The generated include --------------------------------------------------------------------

_HEADER = """--[[
  The Python <-> Lua contract, generated from sidecar/contract.py by sidecar/store/scripts.py
  (do not write these names by hand anywhere else).
  Provides: rcall; P, the pool prefix (KEYS[1]); K_<name> keys and key stems; S_<name> status
  codes and FAIR_<code>, ORDER_<code> policy codes (those some script names); OP_<name> batch
  operation tags; ID_WIDTH and item_id(seq); fmt and int (numbers as Redis should store them);
  tonum(text) (tonumber; numbers remembered both ways: NUMBER_OF, TEXT_OF); split; clear(t) -> t
  emptied;
  encode_<record>(...) and parse_<record>(raw); fields_<record>(raw) -> its fields;
  fields_<operation>(values, at) -> its fields, OP_ARITY[tag] -> its values, tag included.
  Needs: nothing.
]]
local rcall
"""

_HELPERS = """local function fmt(x) return string.format('%%.17g', x) end
-- Numbers and their text, both ways, remembered as they are met (the library cannot build
-- tables at load: Redis runs its top level without the string library): formatting a number
-- (sprintf) or reading one (strtod, twice per tonumber in Lua 5.1) costs more than the rest of
-- encoding or parsing a record, and the same numbers come back: most in records and counters
-- are small, a counter or a time one call writes is what the next reads, and a call's time and
-- TTLs go into every record it writes. At most %d are remembered, then all are forgotten at
-- once. The generated record code looks both tables up inline (TEXT_OF[n] or int(n)): a call
-- costs more than the lookup. (A do block keeps the helpers' private state off the chunk's 200
-- locals.)
local NUMBER_OF, TEXT_OF, int, tonum, item_id = {}, {}, nil, nil, nil
do
  local remembered, REMEMBER_MAX = 0, %d
  local function forget_if_full()
    if remembered >= REMEMBER_MAX then NUMBER_OF, TEXT_OF, remembered = {}, {}, 0 end
    remembered = remembered + 1
  end
  -- Numbers go to Redis formatted by us: Lua prints large ones with %%.14g and -0 as '-0'.
  function int(x)
    local text = TEXT_OF[x]
    if text then return text end
    text = string.format('%%d', x)
    -- (Both ways only for an integer a double holds exactly, which '%%d' writes exactly; + 0
    -- makes -0 the 0 that tonumber('0') is.)
    if x %% 1 == 0 and x < %d and x > -%d then
      -- (forget_if_full, inline: a Lua call costs more than it does.)
      if remembered >= REMEMBER_MAX then NUMBER_OF, TEXT_OF, remembered = {}, {}, 0 end
      remembered = remembered + 1
      TEXT_OF[x], NUMBER_OF[text] = text, x + 0
    end
    return text
  end
  -- tonumber(text), nil for nil. (Only text -> number is remembered here: a text such as '1e3'
  -- or '007' is not how int writes its number.)
  function tonum(text)
    local n = NUMBER_OF[text]
    if n then return n end
    n = tonumber(text)
    if n then
      forget_if_full()
      NUMBER_OF[text] = n
    end
    return n
  end
  -- An id is its sequence number, zero-padded: consecutive ids share all but their last three
  -- digits, so the head is formatted once per thousand and the tail is remembered.
  local ID_TAIL, id_head_of, id_head = {}, nil, nil
  function item_id(seq)
    local low = seq %% 1000
    local high = (seq - low) / 1000
    if high ~= id_head_of then id_head_of, id_head = high, string.format('%%0%dd', high) end
    local tail = ID_TAIL[low]
    if not tail then
      tail = string.format('%%03d', low)
      ID_TAIL[low] = tail
    end
    local id = id_head .. tail
    -- The id is read back as its number (item_key) in this call and the next ones.
    forget_if_full()
    NUMBER_OF[id] = seq
    return id
  end
end
-- A table kept between calls, emptied for the next one. Cheaper than a new table: Lua makes a
-- table's hash part anew each time it outgrows it (1, 2, 4, 8... entries), and every table it
-- makes is later swept by the collector; an emptied one keeps its keys' slots, so the same keys
-- set again mostly take no new ones (until the collector next visits it and frees the empty
-- slots: then at most one re-size). Emptying costs a `next` call per key.
local function clear(t)
  for k in pairs(t) do t[k] = nil end
  return t
end
local function split(s)
  local out, i = {}, 1
  while true do
    local j = string.find(s, %s, i, true)
    if not j then
      out[#out + 1] = string.sub(s, i)
      return out
    end
    out[#out + 1] = string.sub(s, i, j - 1)
    i = j + 1
  end
end
"""


def _lua_string(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_:|*., ^$()\[\]-]*", value):
        raise ValueError(f"{value!r} needs quoting rules the generator does not have")
    return f"'{value}'"


# How the Lua side writes a field of each kind (contract.Field.kind).
# (A number's text met before is looked up without calling int: a call costs more than the
# lookup.)
_WRITE = {"s": "%s", "i": "(TEXT_OF[%s] or int(%s))", "f": "fmt(%s)"}


def _encode_lua(record: contract.Record) -> str:
    names = record.names()
    sep = f" .. {_lua_string(contract.SEP)} .. "

    def join(fields: tuple[contract.Field, ...]) -> str:
        return sep.join(_WRITE[f.kind].replace("%s", f.name) for f in fields)

    body = f"  return {join(record.fields)}\n"
    if record.required < len(names):
        first_optional = names[record.required]
        short = join(record.fields[: record.required])
        body = f"  if {first_optional} == nil then return {short} end\n" + body
    return f"local function encode_{record.name}({', '.join(names)})\n{body}end\n"


def _match_lua(record: contract.Record) -> str:
    """Lua statements that set v1..vN to the fields of ``raw`` (strings; nil when missing)."""
    # One string.match for every field (a call per record, not a find and a sub per field);
    # a record with fewer fields than the record has (a short lane id) is split instead, which
    # leaves the missing ones nil.
    names = [f"v{i}" for i in range(1, len(record.fields) + 1)]
    listed = ", ".join(names)
    field = f"([^{contract.SEP}]*)"
    pattern = _lua_string("^" + contract.SEP.join([field] * len(names)))
    taken = ", ".join(f"f[{i}]" for i in range(1, len(names) + 1))
    short = ""
    if record.required < len(names):
        # Exactly the required fields (a lane id without its workload part).
        required = names[: record.required]
        exact = _lua_string("^" + contract.SEP.join([field] * len(required)) + "$")
        short = f"  if v1 == nil then {', '.join(required)} = string.match(raw, {exact}) end\n"
    return (
        f"  local {listed} = string.match(raw, {pattern})\n{short}"
        f"  if v1 == nil then\n    local f = split(raw)\n    {listed} = {taken}\n  end\n"
    )


# How many numbers int and tonum remember at most (then they forget all at once; see _HELPERS).
REMEMBERED_NUMBERS = 1024
# Integers below this (in magnitude) are exact in a double.
EXACT_INTEGERS = 2**53


def _number_lua(name: str) -> str:
    """A Lua expression: the number in string ``name`` (nil stays nil). A number met before (most
    field values are) is looked up instead of read by tonumber (whose strtod costs more than
    the rest of a parse): ``tonum`` in the contract include."""
    return f"(NUMBER_OF[{name}] or tonum({name}))"


def _parse_lua(record: contract.Record) -> str:
    values = ", ".join(
        f"{f.name} = {_number_lua(f'v{i}')}" if f.kind in "if" else f"{f.name} = v{i}"
        for i, f in enumerate(record.fields, 1)
    )
    head = f"local function parse_{record.name}(raw)\n"
    return f"{head}{_match_lua(record)}  return {{ {values} }}\nend\n"


def _fields_lua(record: contract.Record) -> str:
    listed = ", ".join(f"v{i}" for i in range(1, len(record.fields) + 1))
    head = f"local function fields_{record.name}(raw)\n"
    return f"{head}{_match_lua(record)}  return {listed}\nend\n"


def names_used_by_scripts() -> set[str]:
    """Every name the hand-written scripts and includes mention (comments too: that only keeps
    more)."""
    lua = _lua_dir()
    texts = [p.read_text() for p in (*lua.glob("*.lua"), *(lua / "includes").glob("*.lua"))]
    return set(re.findall(r"\w+", "".join(texts)))


def lua_codes() -> dict[str, str]:
    """Every status and policy code by the name the contract include gives it, with its Lua
    value (the include defines those some script names: names_used_by_scripts)."""
    codes = {f"S_{s.name}": str(int(s)) for s in contract.ScriptStatus}
    codes |= {f"FAIR_{c.upper()}": _lua_string(c) for c in contract.FAIRNESS_CODES}
    codes |= {f"ORDER_{c.upper()}": _lua_string(c) for c in contract.ORDERING_CODES}
    return codes


def _operation_lua(record: contract.Record) -> str:
    """fields_<operation>(v, at): the fields (tag left out) of the operation whose tag is v[at],
    in a list of decoded values (lua/includes/operations.lua)."""
    listed = ", ".join(f"v[at + {i}]" for i in range(1, len(record.fields)))
    return f"local function fields_{record.name}(v, at) return {listed} end\n"


# Globals the library reads as locals of its chunk (contract_lua): the ones its hot paths read
# most (~50 of ~90 global reads per queued admission, docs/scaling.md). Each is one of the
# chunk's 200 locals (tests/test_lua_loader.py keeps ten spare).
_SHADOWED = ("pairs", "string", "math")


@cache
def contract_lua() -> str:
    """The ``contract`` include, generated from sidecar/contract.py."""
    lines = [_HEADER]
    # Keys depend on the pool, so on the call: begin_call sets them (a function library is
    # loaded once for every pool).
    lines.append("local P, " + ", ".join(f"K_{k.name}" for k in contract.KEYS) + "\n")
    # redis.call exists only inside a call (not while a library loads).
    # The keys of a pool are built once per pool and kept between calls (bounded like the
    # configuration cache, lua/includes/config.lua).
    names = ", ".join(f"K_{k.name}" for k in contract.KEYS)
    built = ", ".join(f"p .. {_lua_string(k.suffix)}" for k in contract.KEYS)
    taken = ", ".join(f"k[{i}]" for i in range(1, len(contract.KEYS) + 1))
    # The standard library the hot paths use most, as locals: a function's globals are a
    # protected empty table whose metatable's __index is the real one (Redis's function_lua.c),
    # so each global name costs three table lookups. They exist only inside a call, so the
    # first call takes them (through _G, as the locals hide the names).
    lines.append(f"local {', '.join(_SHADOWED)}\n")
    lines.append(
        "local set_prefix\n"
        "do\n"
        "  local PREFIX_KEYS, PREFIXES_KEPT = {}, 0\n"
        "  function set_prefix(p)\n"
        # Calls come in runs on one pool (a coalesced call, a replica's own pool): its keys are
        # set already.
        "    if p == P then return end\n"
        "    rcall, P = redis.call, p\n"
        f"    if not {_SHADOWED[0]} then\n"
        "      local g = _G\n"
        f"      {', '.join(_SHADOWED)} = {', '.join(f'g.{n}' for n in _SHADOWED)}\n"
        "    end\n"
        "    local k = PREFIX_KEYS[p]\n"
        "    if not k then\n"
        "      if PREFIXES_KEPT >= 256 then PREFIX_KEYS, PREFIXES_KEPT = {}, 0 end\n"
        f"      k = {{ {built} }}\n"
        "      PREFIX_KEYS[p], PREFIXES_KEPT = k, PREFIXES_KEPT + 1\n"
        "    end\n"
        f"    {names} = {taken}\n"
        "  end\n"
        "end\n"
    )
    for name in (
        "CFG_DIGEST",
        "QUEUED_BANDS",
        "CFG_BAND",
        "CFG_BAND_DEFAULT",
        "CFG_BAND_NEGATIVE",
        "BAND_QUEUED",
        "BAND_BYTES",
        "RR_CURSOR",
        "REPLICA_NUMBER",
        "OWNER_ID",
        "OWNER_QUEUED",
        "RECLAIM",
        "WGROUP_FIELD",
        "WORKLOAD_COUNTS",
        "WORKLOAD_ACTIVE",
        "GROUP_SEP",
        "SEP",
        "RANK_FLOW_SEP",
        "ID_LIST_SEP",
        "DETECTOR_UTILIZATION",
        "OP_ENQUEUE",
        "OP_RELEASE",
        "OP_RELEASE_HELD",
        "ANON_FALLBACK",
        "POOL_LAYOUT",
        "POOL_LAYOUT_NOTE",
        "POOL_STAMP",
    ):
        lines.append(f"local {name} = {_lua_string(getattr(contract, name))}\n")
    settings = ", ".join(f"{f} = true" for f in contract.CFG_FIELDS)
    optional = ", ".join(map(_lua_string, contract.CFG_OPTIONAL))
    lines.append(f"local CFG_FIELD = {{ {settings} }}\nlocal CFG_OPTIONAL = {{ {optional} }}\n")
    for name in ("ITEM_BUCKET", "DEADLINE_KEEP_MS", "NO_SLO_KEY", "RANK_KEY_SCALE"):
        lines.append(f"local {name} = {getattr(contract, name)}\n")
    # Only the codes some script uses, like the codecs below (each is one of the chunk's locals).
    used = names_used_by_scripts()
    lines += [f"local {name} = {code}\n" for name, code in lua_codes().items() if name in used]
    lines.append(f"local ID_WIDTH = {contract.ID_WIDTH}\n")
    lines.append(
        _HELPERS
        % (
            REMEMBERED_NUMBERS,
            REMEMBERED_NUMBERS,
            EXACT_INTEGERS,
            EXACT_INTEGERS,
            contract.ID_WIDTH - 3,
            _lua_string(contract.SEP),
        )
    )
    # Only the codecs some script uses: each is a local of the library's main chunk, which Lua
    # 5.1 allows 200 (see library()).
    for record in contract.RECORDS:
        codecs = ((f"encode_{record.name}", _encode_lua), (f"parse_{record.name}", _parse_lua))
        lines += [make(record) for name, make in codecs if name in used]
    lines += [_fields_lua(record) for record in contract.FIELD_READS]
    lines += [_operation_lua(r) for r in contract.OPERATIONS.values() if f"fields_{r.name}" in used]
    # Values per operation, its tag included.
    arity = ", ".join(
        f"[{_lua_string(t)}] = {len(r.fields)}" for t, r in contract.OPERATIONS.items()
    )
    lines.append(f"local OP_ARITY = {{ {arity} }}\n")
    # The BEST record's three fields in one string.match: the first two hold no SEP.
    sep = re.escape(contract.SEP).replace("\\", "%")
    lines.append(_BEST.replace("BEST_PATTERN", f"'^([^{sep}]*){sep}([^{sep}]*){sep}(.*)$'"))
    return "".join(lines)


# A workload's best lane and its group's count of lanes ('key|lanes|rank member', the key a whole
# number: contract.RANK_KEY_SCALE): the member holds SEP itself, so only the first two SEPs split
# (Python twin: contract.split_best).
_BEST = """local function encode_best(best)
  return int(best.key) .. SEP .. int(best.n) .. SEP .. best.member
end
local function parse_best(raw)
  local key, n, member = string.match(raw, BEST_PATTERN)
  return { key = NUMBER_OF[key] or tonum(key), n = NUMBER_OF[n] or tonum(n), member = member }
end
"""
