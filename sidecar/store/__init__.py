"""The shared state of a pool: Lua scripts over Redis, or over an embedded in-process store."""

from sidecar.store.pool import Delivery, PoolStore, ScriptReply
from sidecar.store.scripts import load_scripts

__all__ = ["Delivery", "PoolStore", "ScriptReply", "load_scripts"]
