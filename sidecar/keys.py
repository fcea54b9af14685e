"""Identifier rules and the pool's key prefix.

Every key of a pool starts with ``as:{<pool>}:`` so one hash tag puts a pool on one cluster slot and
each script touches one slot. The Lua scripts receive that prefix as KEYS[1] and derive the rest
from the suffixes in sidecar/contract.py, which also holds the escaping rules re-exported here.
"""

from __future__ import annotations

import re

from sidecar.contract import KEYS, escape_id, unescape_id

__all__ = [
    "KEY_SUFFIXES",
    "MAX_ID_LENGTH",
    "VALID_ID",
    "VALID_POOL",
    "escape_id",
    "is_valid_id",
    "key_id",
    "pool_prefix",
    "unescape_id",
]

MAX_ID_LENGTH = 128
# Ids a header may carry (workload, fairness, request). Anything else is not an id: lenient mode
# treats it as missing, strict mode answers 400.
VALID_ID = re.compile(r"[A-Za-z0-9._~:/@+=-]{1,128}")
VALID_POOL = re.compile(r"[A-Za-z0-9._-]{1,64}")

# The key layout under the pool prefix, for readers (from sidecar/contract.py KEYS).
KEY_SUFFIXES = {k.suffix: f"{k.kind}: {k.doc}" for k in KEYS}


def is_valid_id(value: str) -> bool:
    return VALID_ID.fullmatch(value) is not None


def pool_prefix(pool: str) -> str:
    """The prefix of every key of ``pool``: the braces make the pool name the hash tag, so all of
    a pool's keys share one cluster slot and each script touches one slot."""
    if VALID_POOL.fullmatch(pool) is None:
        raise ValueError(f"pool name {pool!r} must match {VALID_POOL.pattern}")
    return f"as:{{{pool}}}:"


def key_id(value: str, fallback: str = "") -> str:
    """An id ready for a key: escaped if valid, else ``fallback`` (bounds hold even for callers
    that build requests without the header decoder)."""
    return escape_id(value) if is_valid_id(value) else fallback
