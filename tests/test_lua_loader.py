"""The Lua loader: nested includes, each once, in dependency order; cycles and unknown names fail
with the line that caused them; every shipped script expands and declares what it needs."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.store.scripts import (
    SCRIPT_NAMES,
    IncludeError,
    contract_lua,
    expand_includes,
    function_name,
    library,
    script_source,
)

LUA = Path(__file__).resolve().parents[1] / "lua"


def reader(sources: dict[str, str]) -> Callable[[str], str | None]:
    return sources.get


def test_nested_includes_expand_depth_first_and_once() -> None:
    sources = {
        "base": "B\n",
        "left": "-- @include base\nL\n",
        "right": "-- @include base\n-- @include left\nR\n",
    }
    text = "-- @include right\n-- @include left\n-- @include base\nS\n"
    assert expand_includes("s.lua", text, reader(sources)) == "B\nL\nR\nS\n"


def test_a_cycle_names_the_line_that_closes_it() -> None:
    sources = {"a": "x\n-- @include b\n", "b": "y\nz\n-- @include a\n"}
    with pytest.raises(IncludeError) as err:
        expand_includes("s.lua", "-- @include a\n", reader(sources))
    assert str(err.value) == ("includes/b.lua:3: include cycle s.lua -> a -> b -> a: -- @include a")


def test_an_include_of_itself_is_a_cycle() -> None:
    with pytest.raises(IncludeError, match=r"includes/a.lua:1: include cycle s.lua -> a -> a"):
        expand_includes("s.lua", "-- @include a\n", reader({"a": "-- @include a\n"}))


def test_an_unknown_include_names_its_line() -> None:
    with pytest.raises(IncludeError, match=r"^s.lua:2: no include named 'nope'"):
        expand_includes("s.lua", "x\n-- @include nope\n", reader({}))


def test_only_whole_include_lines_count() -> None:
    text = "--  @include a\nlocal s = '-- @include a'\n"
    assert expand_includes("s.lua", text, reader({"a": "A\n"})) == text


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_every_script_expands_with_each_include_once(name: str) -> None:
    source = script_source(name)
    assert "@include" not in source
    # Each include's header appears once: duplicates were removed.
    headers = re.findall(r"^--\[\[\n  (.+)$", source, flags=re.MULTILINE)
    assert len(headers) == len(set(headers))
    assert source.count("local rcall\n") == 1
    assert source.count("begin_call(KEYS[1])") == 1


def test_the_function_library_holds_every_script_and_each_include_once() -> None:
    name, source = library()
    assert source.startswith(f"#!lua name={name}\n")
    headers = re.findall(r"^--\[\[\n  (.+)$", source, flags=re.MULTILINE)
    assert len(headers) == len(set(headers))
    registered = re.findall(r"^redis.register_function\('(\w+)'", source, flags=re.MULTILINE)
    assert registered == [function_name(s) for s in SCRIPT_NAMES]
    # Nothing calls Redis while the library loads: only inside a call (begin_call first).
    # (A function ends at the first 'end' indented as its 'function', in a do block or not.)
    top_level = re.sub(
        r"(?sm)^( *)(?:local )?function .*?\n\1end\n|redis.register_function.*", "", source
    )
    assert "rcall(" not in top_level and "redis.call" not in top_level


def test_each_include_has_a_header_and_declares_what_it_needs() -> None:
    """bullmq style: a header saying what the include provides and needs, and an ``@include``
    line for each of those needs (so an include works wherever it is pulled in)."""
    for path in sorted((LUA / "includes").glob("*.lua")):
        text = path.read_text()
        assert text.startswith("--[[\n"), path
        header = text[: text.index("]]")]
        assert "Provides:" in header, path
        needs = re.search(r"Needs: ([^.]*)\.", header)
        assert needs is not None, path
        declared = re.findall(r"^-- @include (\w+)$", text, flags=re.MULTILINE)
        listed = [n.strip() for n in needs.group(1).split(",")]
        assert declared == ([] if listed == ["nothing"] else listed), path
    assert "Needs: nothing." in contract_lua()


def test_every_script_keeps_its_header_block() -> None:
    for name in SCRIPT_NAMES:
        text = (LUA / f"{name}.lua").read_text()
        assert text.startswith("--[[\n"), name
        header = text[: text.index("]]")]
        assert "KEYS[1]" in header and "Output:" in header, name


LUA_BUILTINS = {
    "tonumber",
    "tostring",
    "ipairs",
    "pairs",
    "next",
    "unpack",
    "select",
    "type",
    "error",
    "pcall",
    "rawset",
    "rawget",
    "setmetatable",
}


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_every_function_is_defined_before_it_is_used(name: str) -> None:
    """A local used before its definition would be read as a global (an error in Redis), so the
    includes must come in dependency order and each script must include what it calls."""
    code = re.sub(r"--\[\[.*?\]\]|--[^\n]*|'[^'\n]*'", "", script_source(name), flags=re.DOTALL)
    defined: dict[str, int] = {}
    for m in re.finditer(r"local (?:function )?(\w+(?:\s*,\s*\w+)*)", code):
        for local in m.group(1).split(","):
            defined[local.strip()] = m.start()
    for call in re.finditer(r"(?<![.:\w])([a-z_]\w*)\(", code):
        fn = call.group(1)
        if fn in LUA_BUILTINS or fn == "function":
            continue
        assert fn in defined, f"{name}: {fn} is not defined"
        assert defined[fn] < call.start(), f"{name}: {fn} is used before its definition"


# Lua 5.1 allows a function 200 active locals, and the function library is one chunk: every
# include's top-level locals (and those of a do block, while it runs) count. Past the limit Redis
# refuses the whole library at FUNCTION LOAD ("main function has more than 200 local
# variables"), so keep room: private helpers go inside do blocks (lua/includes/config.lua).
LOCALS_HEADROOM = 10


def test_library_main_chunk_leaves_room_for_more_locals() -> None:
    from lupa import lua51  # fakeredis[lua] runs the same Lua 5.1

    body = library()[1].split("\n", 1)[1]  # without the '#!lua' line
    compile_error = lua51.LuaRuntime().eval("function(s) local _, e = loadstring(s); return e end")
    spare = ", ".join(f"spare{i}" for i in range(LOCALS_HEADROOM))
    assert compile_error(body) is None
    assert compile_error(f"local {spare}\n{body}") is None
