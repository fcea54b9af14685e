"""The contract between Python and the Lua scripts, written once.

Key suffixes, reply status codes, the item id format, the '|'-separated record layouts, the policy
codes and the escaping of ids live here. sidecar/store/scripts.py generates the Lua include
``contract`` from this module (key names, status codes, record codecs), so the scripts and the
Python readers cannot drift apart; tests/test_contract.py checks that the scripts use nothing else.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import msgspec

# --- Keys -------------------------------------------------------------------------------------
# Every key of a pool starts with the prefix 'as:{<pool>}:' (sidecar/keys.py pool_prefix), which
# the scripts receive as KEYS[1]. A suffix ending in ':' is a stem: an (escaped) id follows it.


class KeySpec(NamedTuple):
    name: str  # the Lua constant is K_<name>
    suffix: str
    kind: str  # the Redis type
    doc: str
    fields: tuple[str, ...] = ()  # a hash's fixed field names (empty: fields are ids)


POOL = "pool"
ITEMS = "items:"
HELD = "held:"
LEASED = "leased"
LEASES = "leases"
DEADLINES = "dl:"
RANK = "rank:"
GROUP = "wrank:"
FLOWS = "flows:"
LANE = "lane:"
WORKLOAD = "w:"
ANON = "anon"
WORKLOADS = "workloads"
REPLICAS = "replicas"
INBOX = "inbox:"
SCRAPE = "scrape"

# Fields of the workload counters (w:<workload> and anon): WORKLOAD_COUNTS holds a COUNTS record
# (below: the rate window's bucket index, its count and the previous bucket's, dispatches, last
# request (ms), the EMA of waits (s)), WORKLOAD_ACTIVE the requests queued + in flight, a field
# of its own because a release that has no other reason to read its workload HINCRBYs it. One
# field for the rest is one reply element and one argument where there were six of each.
# Besides them, a workload hash names its best queued workload-aware lane in each ranking set it
# has lanes in: WGROUP_FIELD + ranking set suffix ('<priority>' or '<priority>:<flow>') -> BEST
# record ('' once the group emptied, until maintenance).
WORKLOAD_COUNTS = "k"
WORKLOAD_ACTIVE = "active"
WORKLOAD_FIELDS = (WORKLOAD_COUNTS, WORKLOAD_ACTIVE)
WGROUP_FIELD = "g:"
# The pool hash holds the configuration and the pool's counters together, so a script reads
# both with one HGETALL and writes what changed with one HSET.
# Configuration fields (configure.lua); besides them, 'band:<priority>', 'band:*' and 'band:-*'
# hold band records.
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
    # The utilization detector (absent: the concurrency detector): 'u', how old a sample may be
    # (ms), queueDepthThreshold and headroom (the dispatch bound between samples).
    "det",
    "stale",
    "qdt",
    "head",
    # The concurrency detector's token limit (tokens or hybrid mode; absent: none).
    "tokLimit",
)
# Settings a configuration may leave out: configure.lua deletes those it does not send, so a
# pool reconfigured from the utilization detector, or from tokens mode, does not keep them.
CFG_OPTIONAL = ("recover", "det", "stale", "qdt", "head", "tokLimit")
# The digest of the configuration fields (CFG_FIELDS and band records), written by
# configure.lua: the hot scripts keep the parsed configuration between calls while it is
# unchanged (lua/includes/config.lua load_cfg_hot).
CFG_DIGEST = "cfgv"
DETECTOR_UTILIZATION = "u"
# The newest saturation sample (lua/sample.lua): pool saturation, its pool time, stale and all
# endpoints, and the dispatches since it was written.
SAMPLE_FIELDS = ("sat", "satT", "satStale", "satN", "since")
# Counter fields: queued count and bytes, in-flight count, item sequence, next maintenance time,
# replica number sequence, next deadline second to sweep, lowest item bucket that may hold a
# queued item, estimated tokens in flight.
STATS_FIELDS = ("qn", "qbytes", "inflight", "seq", "maint", "rseq", "dl0", "ilo", "tok")
# The version of the Redis layout this file describes: raise it with every change that a sidecar
# of the version before cannot read or would corrupt (a key, a field, a record's format). Two
# versions never share a pool: configure.lua refuses a pool written in another layout, and every
# script finds its configuration missing there (docs/upgrading.md). 2: a workload with one lane
# in a ranking set has no group zset (756c948). 3: the pool's write stamp (POOL_STAMP), which
# every writer of the pool must write, and a workload's counters in one field (WORKLOAD_COUNTS).
LAYOUT_VERSION = 3
# A field whose value is longer than Redis's hash-max-listpack-value (64 by default), written by
# configure.lua, so Redis keeps the pool hash as a hashtable: every script reads and writes a
# dozen of its fields, and in a listpack each of those is a scan of the whole hash. Its value
# also names the layout version, and the configuration digest (CFG_DIGEST) covers it.
POOL_LAYOUT = "layout"
POOL_LAYOUT_NOTE = (
    f"layout {LAYOUT_VERSION}, hashtable: this value is longer than hash-max-listpack-value, "
    "so each field is found without a scan"
)
# The note sidecars wrote before the note named a version (up to 1b7bfd2): layout 2.
POOL_LAYOUT_NOTE_UNVERSIONED = (
    "hashtable: this value is longer than hash-max-listpack-value, so each field is found "
    "without a scan"
)
# The pool's write stamp: every script call that changes the pool hash writes a new one with its
# changes, a text no other Redis and no other load of the function library writes, and the
# library keeps the pool's fields between calls while the stamp is the one it wrote last
# (includes/config.lua POOL_CACHE). Whatever else changes the hash (a tool, by hand) must delete
# this field with its change.
POOL_STAMP = "ws"


def layout_is_ours(note: str | None) -> bool:
    """Whether a pool whose POOL_LAYOUT field holds ``note`` (None: absent) is in this layout;
    includes/config.lua foreign_layout() is its twin."""
    return note is None or note == POOL_LAYOUT_NOTE


def layout_named(note: str) -> str:
    """The layout a POOL_LAYOUT note names ('layout 3'): what precedes its first comma."""
    if note == POOL_LAYOUT_NOTE_UNVERSIONED:
        return "layout 2"
    return note.split(",")[0]


# A replica's held hash (held:<number>) carries the same field, written when the replica gets its
# number and deleted when it is reclaimed (then the hash goes with its last slot): a replica holds
# tens of slots, and every admission finds or adds one, each a scan of the hash in a listpack.
# Readers of a held hash skip it (a hash written before it existed may lack it).

# Set ('1') while an item may be queued or in flight that the pool counts as anonymous although
# its request named a workload (the pool tracked workloadRegistry's cap of workloads already):
# its replica knows it by the name, so a release naming the slot's workload (OP_RELEASE_HELD)
# is taken on trust only while this is absent. Deleted once nothing is queued or in flight.
ANON_FALLBACK = "fb"
# The bands with queued items (ID_LIST_SEP-separated priorities, in no order), so the scripts
# find the highest without scanning the pool hash (lua/includes/counters.lua queued_bands).
QUEUED_BANDS = "qb"
CFG_BAND = "band:"  # band:<priority> holds that band's BAND_CONFIG record
CFG_BAND_DEFAULT = CFG_BAND + "*"  # the template of unlisted bands
CFG_BAND_NEGATIVE = CFG_BAND + "-*"  # the template of unlisted negative bands, when configured
# Per-band counter stems: queued count, queued bytes ('0' once the band emptied), and the flow a
# round-robin band served last.
BAND_QUEUED = "n:"
BAND_BYTES = "b:"
RR_CURSOR = "rr:"
# Per-replica stems. Replicas are interned: REPLICA_NUMBER + replica id -> its number, and
# OWNER_ID + number -> the id, so records name their owner by a short number; a number is never
# reused, so a replica that comes back after it was presumed dead starts afresh under a new one.
# OWNER_QUEUED + number: queued items it owns; RECLAIM + number: the next item bucket to scan
# while a presumed-dead owner's queued items are dropped (maintain.lua).
REPLICA_NUMBER = "r:"
OWNER_ID = "o:"
OWNER_QUEUED = "q:"
RECLAIM = "x:"
POOL_STEMS = (
    CFG_BAND,
    BAND_QUEUED,
    BAND_BYTES,
    RR_CURSOR,
    REPLICA_NUMBER,
    OWNER_ID,
    OWNER_QUEUED,
    RECLAIM,
)
# Queued item records live in hashes of ITEM_BUCKET consecutive ids (items:<seq div N>, field
# <seq mod N>), small enough to stay listpacks.
ITEM_BUCKET = 128
# Deadline buckets (dl:<second>) expire this long after their second: the sweep never needs them
# later, since owners evict their own items on time and a dead owner's are reclaimed.
DEADLINE_KEEP_MS = 120_000

KEYS: tuple[KeySpec, ...] = (
    KeySpec(
        "POOL",
        POOL,
        "hash",
        "configuration (configure.lua) and counters: queued, in flight, sequence, per band, "
        "per replica",
        (
            *CFG_FIELDS,
            CFG_DIGEST,
            *STATS_FIELDS,
            QUEUED_BANDS,
            ANON_FALLBACK,
            *SAMPLE_FIELDS,
            POOL_LAYOUT,
            POOL_STAMP,
        ),
    ),
    KeySpec("ITEMS", ITEMS, "hash", "items:<bucket>: id mod ITEM_BUCKET -> queued item record"),
    KeySpec(
        "HELD",
        HELD,
        "hash",
        "held:<owner number>: slots a replica holds -> HELD record, and POOL_LAYOUT",
    ),
    KeySpec("LEASED", LEASED, "hash", "slots held by tickets (gateways) -> LEASED record"),
    KeySpec("LEASES", LEASES, "zset", "ticket-held item ids by lease expiry (ms)"),
    KeySpec(
        "DEADLINES",
        DEADLINES,
        "list",
        "dl:<second>: ids queued with their TTL deadline in that second (stale ids skipped)",
    ),
    KeySpec(
        "RANK",
        RANK,
        "zset",
        "rank:<priority> (global-strict) or rank:<priority>:<flow> (round-robin): lanes by "
        "their head's key, members RANK_MEMBER",
    ),
    KeySpec(
        "GROUP",
        GROUP,
        "zset",
        "wrank:<ranking set suffix>|<workload>: a workload's workload-aware lanes in one ranking "
        "set, by their head's part of the key (WorkloadAwareOrdering.head_key), members "
        "RANK_MEMBER, while it has two or more there (the best alone is in the workload hash, "
        "split_best); the ranking set holds only the best of them",
    ),
    KeySpec(
        "FLOWS",
        FLOWS,
        "zset",
        "flows:<priority>: flows of a round-robin band with queued items (lexicographic rotation)",
    ),
    KeySpec(
        "LANE",
        LANE,
        "list",
        "lane:<lane id>: a lane's item ids in dispatch order (a zset by deadline for edf)",
    ),
    KeySpec(
        "W",
        WORKLOAD,
        "hash",
        "w:<workload>: registry counters of one workload, and its best lanes",
        WORKLOAD_FIELDS,
    ),
    KeySpec("ANON", ANON, "hash", "aggregate counters of anonymous traffic", WORKLOAD_FIELDS),
    KeySpec(
        "WORKLOADS",
        WORKLOADS,
        "zset",
        "tracked workloads, for idle expiry and the cap; scored when first tracked or last "
        "found active (the hash's COUNTS record's t is the last request)",
    ),
    KeySpec("REPLICAS", REPLICAS, "zset", "replica ids by lease expiry (ms)"),
    KeySpec("INBOX", INBOX, "list", "inbox:<replica>: wake-ups (DELIVERY) for a replica"),
    KeySpec(
        "SCRAPE",
        SCRAPE,
        "string",
        "the replica holding the pool's scrape lease (utilization detector, "
        "sidecar/telemetry/lease.py)",
    ),
)


RANK_FLOW_SEP = ":"  # rank:<priority>:<flow>
GROUP_SEP = "|"  # wrank:<ranking set suffix>|<workload>


def rank_key(priority: int | str, flow: str | None = None) -> str:
    """The ranking set of a band (global-strict) or of one of its flows (round-robin); ``flow``
    is the escaped id, as it appears in lane ids."""
    return f"{RANK}{priority}" if flow is None else f"{RANK}{priority}{RANK_FLOW_SEP}{flow}"


def workload_key(escaped_id: str) -> str:
    """Counters of a workload; anonymous traffic ('') shares one aggregate."""
    return WORKLOAD + escaped_id if escaped_id else ANON


def held_key(owner_number: int | str) -> str:
    return f"{HELD}{owner_number}"


def items_key(seq: int) -> tuple[str, str]:
    """The bucket hash and field of a queued item's record."""
    return f"{ITEMS}{seq // ITEM_BUCKET}", str(seq % ITEM_BUCKET)


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
    # configure.lua refused: the pool was written by a sidecar with another Redis layout
    # (LAYOUT_VERSION); the reply's second element is that pool's POOL_LAYOUT note.
    LAYOUT_MISMATCH = -3


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


# A queued item (items:<bucket> hash): its owner's number, its lane's parts, size, enqueue time
# (ms relative to the pool's epoch), TTL and ticket lease (ms). Short, so buckets stay listpacks.
# tok: its estimated tokens (concurrency detector, tokens mode); slo: its TTFT objective, ms
# (slo-deadline ordering; 0 = none). The owner number is read as text: Lua only joins it into
# field and key names (q:<n>, held:<n>), and joining a number formats it with sprintf each time.
ITEM = _record("item", "owner:s band:s flow:s wid:s crit:i bytes:i enq:i ttl:i lease:i tok:i slo:i")
# A slot a replica holds (held:<owner number>): for which workload, dispatched when.
HELD_RECORD = _record("held", "wid:s since:i tok:i")
# A slot a ticket holds (leased hash): the replica that issued it, the workload, since when.
LEASED_RECORD = _record("leased", "owner:s wid:s since:i tok:i")
# An outcome for a replica's item, in a reply or its inbox.
DELIVERY = _record("delivery", "id:s status:i wait:i")
# A lane id: 'band|flow' (fcfs, edf) or 'band|flow|workload|criticality' (workload-aware).
LANE_ID = _record("lane", "band:s flow:s wid:s crit:i", required=2)
# A band's configuration (pool field band:<priority>): policy codes, caps, then the
# workload-aware policy's numbers (WorkloadAwareOrdering.lua_parameters, zeros otherwise).
BAND_CONFIG = _record(
    "band", "fair:s order:s maxReq:i maxBytes:i wW:f cW:f rW:f maxWait:f maxRate:f aging:f"
)
# What reconcile.lua did: in-flight items released, held slots re-added, queued items dropped.
RECONCILED = _record("reconciled", "released:i readded:i dropped:i")
# A coalesced operation: its tag, then its fields, in these orders. batch.lua takes every
# operation of a call in one argument: all their values one after another as one MessagePack
# stream (batch_ops), which Redis's cmsgpack decodes in one C call into Lua strings and numbers
# (a string.match of a '|'-separated record costs several times more, and an argument per
# operation or per field costs a Lua string each). Tags are one character.
OP_ENQUEUE, OP_RELEASE, OP_RELEASE_HELD = "e", "r", "h"
BATCH_ENQUEUE = _record(
    "op_enqueue", "op:s band:s flow:s wid:s crit:i bytes:i ttl:i lease:i tok:i slo:i"
)
BATCH_RELEASE = _record("op_release", "op:s id:s")
# A release of a slot the caller holds, with what it enqueued it with: the escaped workload id
# and the tokens. The pool then only deletes the slot's record (whether it existed says whether
# the slot was held) instead of reading it first; it takes them on trust unless ANON_FALLBACK is
# set, and reads the record then.
BATCH_RELEASE_HELD = _record("op_release_held", "op:s id:s tok:i wid:s")
# A coalesced enqueue's reply that carries no outcome of another item (the common one): its
# status and two fields, one string, where a reply with outcomes is a list as the script's own.
# Redis converts a list reply element by element, which costs more than one string. A coalesced
# release's reply with no outcome is its status alone, an integer (the caller knows the id).
OP_REPLY = _record("op_reply", "status:i a:s b:s")
# A workload's counters (WORKLOAD_COUNTS field): 0 for each not counted yet (the EMA is read only
# once n, the dispatches, is above 0; t, the last request, stays 0 for anonymous traffic).
COUNTS = _record("counts", "bi:i c:i p:i n:i t:i ema:f")
RECORDS = (
    COUNTS,
    ITEM,
    HELD_RECORD,
    LEASED_RECORD,
    DELIVERY,
    LANE_ID,
    BAND_CONFIG,
    RECONCILED,
    OP_REPLY,
)
# batch.lua's operations, by tag: Lua reads each one's fields by position from the decoded
# values (fields_<name>(values, at), generated), so no field is text to parse.
OPERATIONS = {
    OP_ENQUEUE: BATCH_ENQUEUE,
    OP_RELEASE: BATCH_RELEASE,
    OP_RELEASE_HELD: BATCH_RELEASE_HELD,
}
# Read by Lua field by field from a '|'-separated record, where no table of the fields is wanted
# (a held slot's record, read by every release that is not taken on trust).
FIELD_READS = (HELD_RECORD, COUNTS)

# Each operation's fields (its tag left out) as MessagePack should carry them: text or integer.
_WIRE: dict[str, Callable[[Any], object]] = {"s": str, "i": int}
_FIELD_TYPES = {
    tag: tuple(_WIRE[f.kind] for f in record.fields[1:]) for tag, record in OPERATIONS.items()
}
_PACK = msgspec.msgpack.Encoder().encode


def batch_ops(ops: Iterable[tuple[str, Sequence[object]]]) -> bytes:
    """batch.lua's operations argument: OP_ENQUEUE with enqueue.lua's fields after the time and
    the caller, OP_RELEASE with the item id, OP_RELEASE_HELD with the id, tokens and workload."""
    values: list[object] = []
    for kind, args in ops:
        types = _FIELD_TYPES[kind]
        if len(args) != len(types):
            names = OPERATIONS[kind].names()[1:]
            raise ValueError(f"{OPERATIONS[kind].name}: {len(args)} fields, expected {names}")
        values.append(kind)
        values += [make(a) for make, a in zip(types, args)]  # noqa: B905 (lengths checked)
    return msgpack_stream(values)


def msgpack_stream(values: list[object]) -> bytes:
    """The values as one MessagePack stream: one after another, not in an array (cmsgpack's
    unpack then returns them all). A list's encoding is its header (1, 3 or 5 bytes, by length)
    followed by exactly that."""
    n = len(values)
    header = 1 if n < 16 else 3 if n < 1 << 16 else 5
    return _PACK(values)[header:]


def split_best(raw: str) -> tuple[float, str, int]:
    """A workload's best lane in one ranking set (WGROUP_FIELD fields): 'key|lanes|rank member',
    its head part of the key, its rank member (which holds SEP itself, so only the first two
    split) and how many queued lanes the workload has in that set (its group: the GROUP zset
    exists only while it has two or more; includes/lanes.lua). includes/registry.lua parse_best
    is the Lua twin."""
    key, _, rest = raw.partition(SEP)
    lanes, _, member = rest.partition(SEP)
    return float(key), member, int(lanes)


# Separates the ids in a reply field that lists several (reconcile.lua's missing ids).
ID_LIST_SEP = ","
BAND_POLICY_NUMBERS = len(BAND_CONFIG.fields) - 4


def split_rank_member(member: str) -> tuple[str, str]:
    """A rank member is the lane's head id followed by the lane id: (head id, lane id)."""
    return member[:ID_WIDTH], member[ID_WIDTH:]


# Policy codes in band records (each policy class's ``lua_code``); the scripts see FAIR_<CODE>
# and ORDER_<CODE>.
FAIRNESS_CODES = ("gs", "rr")
ORDERING_CODES = ("fcfs", "edf", "wa", "slo")
# slo-deadline ordering: a request without an SLO ranks after every one with (its deadline is
# enq + slo, pool ms), in arrival order among themselves: this plus its sequence.
NO_SLO_KEY = 2**52
# Workload-aware rank keys are whole numbers: each part of the key (the workload's, the head's)
# times RANK_KEY_SCALE, rounded half up, the same way in Lua (lua/includes/ordering.lua
# rank_units) and in Python (WorkloadAwareOrdering.workload_key, head_key), so both sides rank
# alike. Redis keeps a whole score in a listpack zset as an integer: placing a member then reads
# no score with strtod, and neither side formats or parses a 17-digit double. Keys whose parts
# differ by less than 1 / RANK_KEY_SCALE tie and go first come, first served. Exact while a key
# stays below 2**53: aging terms up to ~9 * 10**9 score units.
RANK_KEY_SCALE = 1_000_000


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
