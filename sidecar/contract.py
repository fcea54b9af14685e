"""The contract between Python and the Lua scripts, written once.

Key suffixes, reply status codes, the item id format, the '|'-separated record layouts, the policy
codes and the escaping of ids live here. sidecar/store/scripts.py generates the Lua include
``contract`` from this module (key names, status codes, record codecs), so the scripts and the
Python readers cannot drift apart; tests/test_contract.py checks that the scripts use nothing else.
"""

from __future__ import annotations

import enum
import re
from typing import NamedTuple

# --- Keys -------------------------------------------------------------------------------------
# Every key of a pool starts with the prefix 'as:{<pool>}:' (sidecar/keys.py pool_prefix), which
# the scripts receive as KEYS[1]. A suffix ending in ':' is a stem: an (escaped) id follows it.


class KeySpec(NamedTuple):
    name: str  # the Lua constant is K_<name>
    suffix: str
    kind: str  # the Redis type
    doc: str
    fields: tuple[str, ...] = ()  # a hash's fixed field names (empty: fields are ids)


CFG = "cfg"
STATS = "stats"
ITEMS = "items"
INFLIGHT = "inflight"
DEADLINES = "deadlines"
LEASES = "leases"
BANDS = "bands"
BAND = "band:"
RANK = "rank:"
FLOWS = "flows:"
FLOWLEN = "flowlen"
RRCURSOR = "rrcursor"
LANE = "lane:"
WORKLOAD = "w:"
ANON = "anon"
WLANES = "wlanes:"
WORKLOADS = "workloads"
RERANK = "rerank"
REPLICAS = "replicas"
OWN = "own:"
INBOX = "inbox:"

# Fields of the workload counters (w:<workload> and anon): the rate window's bucket index, its
# count and the previous bucket's, the EMA of waits (s), dispatches, queued + in flight.
WORKLOAD_FIELDS = ("bi", "c", "p", "ema", "n", "active")
# Fields of stats: queued count and bytes, in-flight count, item sequence, next maintenance time.
STATS_FIELDS = ("qn", "qbytes", "inflight", "seq", "maint")
BAND_COUNT_FIELDS = ("n", "bytes")
# Fixed fields of cfg; besides them, 'band:<priority>', 'band:*' and 'band:-*' hold band records.
CFG_FIELDS = (
    "epoch",
    "hold",
    "limit",
    "maxReq",
    "maxBytes",
    "win",
    "alpha",
    "idle",
    "maxTracked",
    "recover",
)
CFG_BAND = "band:"  # cfg field stem: band:<priority> holds that band's BAND_CONFIG record
CFG_BAND_DEFAULT = CFG_BAND + "*"  # the template of unlisted bands
CFG_BAND_NEGATIVE = CFG_BAND + "-*"  # the template of unlisted negative bands, when configured

KEYS: tuple[KeySpec, ...] = (
    KeySpec("CFG", CFG, "hash", "pool configuration written by configure.lua", CFG_FIELDS),
    KeySpec(
        "STATS",
        STATS,
        "hash",
        "queued count/bytes, in flight, sequence, maintenance clock",
        STATS_FIELDS,
    ),
    KeySpec("ITEMS", ITEMS, "hash", "queued item id -> item record (ITEM)"),
    KeySpec(
        "INFLIGHT", INFLIGHT, "hash", "in-flight item id -> in-flight record (INFLIGHT_RECORD)"
    ),
    KeySpec("DEADLINES", DEADLINES, "zset", "queued item ids by TTL deadline (ms)"),
    KeySpec("LEASES", LEASES, "zset", "externally held in-flight item ids by lease expiry (ms)"),
    KeySpec("BANDS", BANDS, "zset", "priority bands that hold queued items, scored by priority"),
    KeySpec(
        "BAND",
        BAND,
        "hash",
        "band:<priority>: the band's queued count and bytes",
        BAND_COUNT_FIELDS,
    ),
    KeySpec(
        "RANK",
        RANK,
        "zset",
        "rank:<priority> (global-strict) or rank:<priority>:<flow> (round-robin): lanes by "
        "their head's key, members RANK_MEMBER",
    ),
    KeySpec(
        "FLOWS",
        FLOWS,
        "zset",
        "flows:<priority>: flows of a round-robin band with queued items (lexicographic rotation)",
    ),
    KeySpec("FLOWLEN", FLOWLEN, "hash", "flow id (FLOW record) -> its queued count"),
    KeySpec("RRCURSOR", RRCURSOR, "hash", "priority -> the flow a round-robin band served last"),
    KeySpec("LANE", LANE, "zset", "lane:<lane id>: a lane's item ids in dispatch order"),
    KeySpec(
        "W", WORKLOAD, "hash", "w:<workload>: registry counters of one workload", WORKLOAD_FIELDS
    ),
    KeySpec("ANON", ANON, "hash", "aggregate counters of anonymous traffic", WORKLOAD_FIELDS),
    KeySpec(
        "WLANES",
        WLANES,
        "hash",
        "wlanes:<workload>: the workload's queued lanes -> their rank members (re-ranking)",
    ),
    KeySpec(
        "WORKLOADS",
        WORKLOADS,
        "zset",
        "tracked workloads by last activity (ms), for idle expiry and the cap",
    ),
    KeySpec("RERANK", RERANK, "set", "workloads with queued workload-aware lanes (maintenance)"),
    KeySpec("REPLICAS", REPLICAS, "zset", "replica ids by lease expiry (ms)"),
    KeySpec("OWN", OWN, "set", "own:<replica>: item ids (queued or in flight) a replica owns"),
    KeySpec("INBOX", INBOX, "list", "inbox:<replica>: wake-ups (DELIVERY) for a replica"),
)


def band_key(priority: int | str) -> str:
    return f"{BAND}{priority}"


RANK_FLOW_SEP = ":"  # rank:<priority>:<flow>


def rank_key(priority: int | str, flow: str | None = None) -> str:
    """The ranking set of a band (global-strict) or of one of its flows (round-robin); ``flow``
    is the escaped id, as it appears in FLOW records."""
    return f"{RANK}{priority}" if flow is None else f"{RANK}{priority}{RANK_FLOW_SEP}{flow}"


def workload_key(escaped_id: str) -> str:
    """Counters of a workload; anonymous traffic ('') shares one aggregate."""
    return WORKLOAD + escaped_id if escaped_id else ANON


def own_key(replica: str) -> str:
    return OWN + replica


def inbox_key(replica: str) -> str:
    return INBOX + replica


# --- Reply status codes ---------------------------------------------------------------------


class ScriptStatus(enum.IntEnum):
    """First element of every script reply; the scripts see each as S_<NAME>."""

    QUEUED = 0
    DISPATCHED = 1
    REJECTED_CAPACITY = 2
    EVICTED_TTL = 3
    EVICTED_CANCELLED = 4
    EVICTED_OTHER = 5
    REJECTED_OTHER = 6
    # Idempotent no-op: the item was not found where the caller expected it.
    NOT_FOUND = 7
    # Errors: the pool's configuration is missing (Redis restarted empty) -> configure and retry.
    NO_CONFIG = -1
    # configure.lua refused: a band with queued items would change its fairness or ordering.
    CONFLICT = -2


# --- Item ids ---------------------------------------------------------------------------------
# Zero-padded decimal sequence numbers: a fixed width makes lexicographic order numeric order,
# and lets a rank member (head id followed by lane id) be split without a separator.
ID_WIDTH = 16


def item_id(seq: int) -> str:
    return f"{seq:0{ID_WIDTH}d}"


# --- Records ----------------------------------------------------------------------------------
# '|'-separated; every id in a record is escaped (escape_id), so it never contains '|'.
SEP = "|"


class Field(NamedTuple):
    name: str
    kind: str  # 's' text, 'i' integer (written with %d), 'f' number


class Record(NamedTuple):
    name: str  # Lua: encode_<name>(...) and parse_<name>(raw) -> { field = value, ... }
    fields: tuple[Field, ...]
    required: int  # fields after this many are optional, all present or all absent

    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def encode(self, *values: object) -> str:
        if len(values) not in (self.required, len(self.fields)):
            raise ValueError(f"{self.name}: {len(values)} fields, expected {self.names()}")
        return SEP.join(repr(v) if isinstance(v, float) else str(v) for v in values)

    def parse(self, raw: str) -> dict[str, str]:
        parts = raw.split(SEP)
        if len(parts) not in (self.required, len(self.fields)):
            raise ValueError(f"{self.name}: {raw!r} does not have the fields {self.names()}")
        return dict(zip(self.names(), parts, strict=False))


def _record(name: str, spec: str, required: int | None = None) -> Record:
    fields = tuple(Field(*f.split(":")) for f in spec.split())
    return Record(name, fields, len(fields) if required is None else required)


# A queued item (items hash). Times are ms relative to the pool's epoch.
ITEM = _record(
    "item",
    "owner:s band:s flow:s wid:s crit:i bytes:i enq:i deadline:i lease:i",
)
# An in-flight slot (inflight hash): who holds it, for which workload, dispatched when; leased is 1
# when the slot may have an entry in the leases zset (a ticket, or a renewed slot), so releasing a
# slot without it does no lease work.
INFLIGHT_RECORD = _record("inflight", "owner:s wid:s since:i leased:i", required=3)
# An outcome for a replica's item, in a reply or its inbox.
DELIVERY = _record("delivery", "id:s status:i wait:i")
# A flow (flowlen field): also the lane id of an fcfs or edf lane, which holds the whole flow.
FLOW = _record("flow", "band:s flow:s")
# A lane id: 'band|flow' (fcfs, edf) or 'band|flow|workload|criticality' (workload-aware).
LANE_ID = _record("lane", "band:s flow:s wid:s crit:i", required=2)
# A band's configuration (cfg field band:<priority>): policy codes, caps, then the
# workload-aware policy's numbers (WorkloadAwareOrdering.lua_parameters, zeros otherwise).
BAND_CONFIG = _record(
    "band", "fair:s order:s maxReq:i maxBytes:i wW:f cW:f rW:f maxWait:f maxRate:f aging:f"
)
# What reconcile.lua did: in-flight items released, held slots re-added, queued items dropped.
RECONCILED = _record("reconciled", "released:i readded:i dropped:i")
RECORDS = (ITEM, INFLIGHT_RECORD, DELIVERY, FLOW, LANE_ID, BAND_CONFIG, RECONCILED)
# Separates the ids in a reply field that lists several (reconcile.lua's missing ids).
ID_LIST_SEP = ","
BAND_POLICY_NUMBERS = len(BAND_CONFIG.fields) - 4


def split_rank_member(member: str) -> tuple[str, str]:
    """A rank member is the lane's head id followed by the lane id: (head id, lane id)."""
    return member[:ID_WIDTH], member[ID_WIDTH:]


# Policy codes in band records (each policy class's ``lua_code``); the scripts see FAIR_<CODE>
# and ORDER_<CODE>.
FAIRNESS_CODES = ("gs", "rr")
ORDERING_CODES = ("fcfs", "edf", "wa")


# --- Escaping ---------------------------------------------------------------------------------
# Characters that pass through escaping unchanged: no hash-tag braces, no key or record separators.
_KEY_SAFE = re.compile(r"[^A-Za-z0-9._-]")
_ESCAPED = re.compile(r"(?:%[0-9A-F]{2})+")


def escape_id(value: str) -> str:
    """Make an id safe inside a key or a record: only ``[A-Za-z0-9._-]`` and ``%XX`` remain.

    Escaping is injective, so two ids never share a key, and it removes ``{``, ``}``, ``:``
    and ``|``, so an id can never move a key to another hash slot or split a record field.
    """
    return _KEY_SAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), value)


def unescape_id(value: str) -> str:
    """The inverse of escape_id, for display (only ``%XX`` runs are decoded; '+' stays '+')."""
    return _ESCAPED.sub(lambda m: bytes.fromhex(m.group().replace("%", "")).decode(), value)
