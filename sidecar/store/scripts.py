"""Reads the Lua scripts shipped with the package and registers each once with redis-py.

A script pulls shared helpers in with a line ``-- @include <name>`` (from ``lua/includes/``).
redis-py's Script object handles SCRIPT LOAD, EVALSHA and the NOSCRIPT fallback.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

_INCLUDE = re.compile(r"^-- @include (\w+)$", re.MULTILINE)
SCRIPT_NAMES = (
    "configure",
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


def _lua_dir() -> Path:
    packaged = resources.files("sidecar") / "lua"
    if packaged.is_dir():
        return Path(str(packaged))
    # A source checkout: lua/ sits beside the package (it is copied into the wheel when built).
    return Path(__file__).resolve().parents[2] / "lua"


@cache
def script_source(name: str) -> str:
    """A script with its includes expanded in place."""
    root = _lua_dir()
    text = (root / f"{name}.lua").read_text()
    return _INCLUDE.sub(lambda m: (root / "includes" / f"{m.group(1)}.lua").read_text(), text)


def load_scripts(client: Any) -> dict[str, Any]:
    """Register every script on a redis-py (or fakeredis) asyncio client."""
    return {name: client.register_script(script_source(name)) for name in SCRIPT_NAMES}
