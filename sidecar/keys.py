"""Identifier rules and the Redis key layout of a pool.

Every key of a pool starts with ``as:{<pool>}:`` so one hash tag puts a pool on one cluster slot and
each script touches one slot. The Lua scripts receive that prefix as KEYS[1] and derive the rest;
the suffixes they use are listed here so a reader finds the whole layout in one place.
"""

from __future__ import annotations

import re

MAX_ID_LENGTH = 128
# Ids a header may carry (workload, fairness, request). Anything else is not an id: lenient mode
# treats it as missing, strict mode answers 400.
VALID_ID = re.compile(r"[A-Za-z0-9._~:/@+=-]{1,128}")
VALID_POOL = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Characters that pass through escaping unchanged: no hash-tag braces, no key separators.
_KEY_SAFE = re.compile(r"[^A-Za-z0-9._-]")

# Key suffixes under the pool prefix (see lua/includes/keys.lua, which builds the same names).
KEY_SUFFIXES = {
    "cfg": "hash: pool configuration written by configure.lua (limits, band templates, registry)",
    "stats": "hash: queued count/bytes, in-flight count, sequence, maintenance clock",
    "items": "hash: queued item id -> record",
    "inflight": "hash: in-flight item id -> record",
    "deadlines": "zset: queued item id by TTL deadline (ms)",
    "leases": "zset: externally held in-flight item id by lease expiry (ms)",
    "bands": "zset: priority bands that hold queued items, scored by priority",
    "band:<p>": "hash: per-band queued count and bytes",
    "rank:<p>[:<flow>]": "zset: lanes of a band (global-strict) or of one flow (round-robin)",
    "flows:<p>": "zset: flows of a round-robin band with queued items (lexicographic rotation)",
    "rrcursor": "hash: band -> the flow a round-robin band served last",
    "lane:<lane id>": "zset: a lane's items in dispatch order",
    "w:<workload>": "hash: registry counters of one workload",
    "wlanes:<workload>": "hash: the workload's queued lanes -> their rank members (re-ranking)",
    "workloads": "zset: tracked workloads by last activity (ms), for idle expiry and the cap",
    "anon": "hash: aggregate counters of anonymous traffic",
    "replicas": "zset: replica id by lease expiry (ms)",
    "own:<replica>": "set: item ids (queued or in flight) a replica owns",
    "inbox:<replica>": "list: wake-ups for a replica's waiting requests",
}


def is_valid_id(value: str) -> bool:
    return VALID_ID.fullmatch(value) is not None


def escape_id(value: str) -> str:
    """Make an id safe inside a key or a Lua record: only ``[A-Za-z0-9._-]`` and ``%XX`` remain.

    Escaping is injective, so two ids never share a key, and it removes ``{``, ``}``, ``:``
    and ``|``, so an id can never move a key to another hash slot or split a record field.
    """
    return _KEY_SAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), value)


def pool_prefix(pool: str) -> str:
    if VALID_POOL.fullmatch(pool) is None:
        raise ValueError(f"pool name {pool!r} must match {VALID_POOL.pattern}")
    return f"as:{{{pool}}}:"


def key_id(value: str, fallback: str = "") -> str:
    """An id ready for a key: escaped if valid, else ``fallback`` (bounds hold even for callers
    that build requests without the header decoder)."""
    return escape_id(value) if is_valid_id(value) else fallback
