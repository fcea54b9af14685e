"""Python and Lua agree on the contract (sidecar/contract.py): the scripts name keys, status codes
and records only through the generated include, and what they write to Redis is exactly the
documented layout."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from sidecar import contract
from sidecar.contract import KEYS, ScriptStatus, escape_id, unescape_id
from sidecar.policies.base import FairnessPolicy, OrderingPolicy
from sidecar.policies.ordering import WorkloadAwareOrdering
from sidecar.store import PoolStore
from sidecar.store.pool import _parse_reply
from sidecar.store.scripts import (
    REMEMBERED_NUMBERS,
    contract_lua,
    expand_includes,
    lua_codes,
    names_used_by_scripts,
)
from tests.conftest import make_config
from tests.pool_keys import inflight_records

ROOT = Path(__file__).resolve().parents[1]
LUA_FILES = sorted((ROOT / "lua").rglob("*.lua"))
# Replies whose first element is a flag, not a status (each documented in its script's header):
# configure fresh/updated, heartbeat known/unknown, maintain ran/skipped, renew renewed,
# reconcile ran.
FLAG_REPLIES = {
    ("configure", "1"),
    ("sample", "1"),
    ("configure", "0"),
    ("heartbeat", "1"),
    ("heartbeat", "0"),
    ("maintain", "1"),
    ("maintain", "0"),
    ("renew", "1"),
    ("reconcile", "1"),
}


def _code(path: Path) -> str:
    """A Lua file without its comments."""
    text = re.sub(r"--\[\[.*?\]\]", "", path.read_text(), flags=re.DOTALL)
    return re.sub(r"--[^\n]*", "", text)


def test_scripts_build_keys_only_from_the_contract() -> None:
    for path in LUA_FILES:
        code = _code(path)
        assert re.search(r"\bP\b", code) is None, f"{path.name} builds a key from P"
        assert "KEYS[" not in code, f"{path.name} reads KEYS itself"
        assert "'|'" not in code, f"{path.name} writes a record by hand"


def test_every_contract_name_the_scripts_use_is_generated() -> None:
    generated = contract_lua()
    declared: set[str] = set()
    for names in re.findall(r"^local (?:function )?([\w, ]+?)(?:\(| =|$)", generated, re.M):
        declared |= {n.strip() for n in names.split(",")}
    for path in LUA_FILES:
        names = set(re.findall(r"\b(?:K|S|FAIR|ORDER)_[A-Z_]+\b", _code(path)))
        names |= set(re.findall(r"\b(?:encode|parse)_\w+(?=\()", _code(path)))
        for name in names:
            assert name in declared, (path, name)


def test_status_codes_in_replies_are_named() -> None:
    literal = re.compile(r"(?:return \{ *|reply\()(-?\d+)")
    for path in LUA_FILES:
        for number in literal.findall(_code(path)):
            assert (path.stem, number) in FLAG_REPLIES, f"{path.name} returns status {number}"


def test_policy_codes_and_band_numbers_match() -> None:
    assert {c.lua_code for c in FairnessPolicy.__subclasses__()} == set(contract.FAIRNESS_CODES)
    assert {c.lua_code for c in OrderingPolicy.__subclasses__()} == set(contract.ORDERING_CODES)
    assert len(WorkloadAwareOrdering().lua_parameters()) == contract.BAND_POLICY_NUMBERS


def test_python_readers_hold_no_key_or_record_literals() -> None:
    for rel in (
        "sidecar/state.py",
        "sidecar/registry.py",
        "sidecar/status.py",
        "sidecar/store/pool.py",
        "sidecar/http/admin.py",
    ):
        text = (ROOT / rel).read_text()
        assert re.search(r"\.key\(f?[\"']", text) is None, rel
        assert re.search(r"[\"']\|[\"']", text) is None, rel
        assert "[:16]" not in text and "[16:]" not in text, rel


def test_escaping_round_trips() -> None:
    for value in ["team/a", "host:8080", "u@x", "a+b", "k=v", "~t", "%41", "ü", "plain.id-1_2"]:
        assert unescape_id(escape_id(value)) == value


# --- The same records on both sides ---------------------------------------------------------


async def _lua(body: str) -> Any:
    client = fakeredis.FakeAsyncRedis()
    # (set_prefix first, as every call does: it takes the library's standard functions.)
    body = "set_prefix(KEYS[1])\n" + body
    script = expand_includes("t.lua", "-- @include contract\n" + body, lambda n: contract_lua())
    try:
        return await client.eval(script, 1, "as:{p}:")
    finally:
        await client.aclose()


async def test_lua_writes_records_python_reads() -> None:
    raw = await _lua("return encode_item(3, '-2', 'f%2F', 'w', 5, 10, 7, 8, 0, 12, 150)")
    assert contract.ITEM.parse(raw.decode()) == {
        "owner": "3",
        "band": "-2",
        "flow": "f%2F",
        "wid": "w",
        "crit": "5",
        "bytes": "10",
        "enq": "7",
        "ttl": "8",
        "lease": "0",
        "tok": "12",
        "slo": "150",
    }
    lane = await _lua("return { encode_lane('1', 'f'), encode_lane('1', 'f', 'w', 3) }")
    assert [contract.LANE_ID.parse(x.decode()) for x in lane] == [
        {"band": "1", "flow": "f"},
        {"band": "1", "flow": "f", "wid": "w", "crit": "3"},
    ]
    # Lua formats an id's head once per thousand ids and remembers its tail: across heads,
    # back again, and at the widths' edges it still writes what Python does.
    seqs = [
        42,
        999,
        1000,
        1001,
        999_999,
        1_000_000,
        42,
        10**15 + 7,
        2**53 - 1,
    ]  # the last: the largest exact double
    got = await _lua("return { " + ", ".join(f"item_id({n})" for n in seqs) + " }")
    assert [x.decode() for x in got] == [contract.item_id(n) for n in seqs]
    # Large numbers are remembered each way too: repeats and alternations read the same.
    texts = ["1234567", "1234567", "7654321", "1234567", "5", "1234567"]
    got = await _lua("return { " + ", ".join(f"int({t})" for t in texts) + " }")
    assert [x.decode() for x in got] == texts
    got = await _lua("return { " + ", ".join(f"tonum('{t}')" for t in texts) + " }")
    assert got == [int(t) for t in texts]
    assert await _lua("return ID_WIDTH") == contract.ID_WIDTH == len(contract.item_id(1))
    # A coalesced operation's reply with no outcomes: one string, read as the script's list.
    one = await _lua("return encode_op_reply(S_DISPATCHED, '0000000000000001', '0')")
    assert contract.OP_REPLY.parse(one.decode()) == {
        "status": str(ScriptStatus.DISPATCHED),
        "a": "0000000000000001",
        "b": "0",
    }
    assert _parse_reply(one) == _parse_reply(
        [int(ScriptStatus.DISPATCHED), b"0000000000000001", b"0"]
    )
    delivery = await _lua("return encode_delivery('0000000000000001', S_EVICTED_TTL, 12)")
    assert contract.DELIVERY.parse(delivery.decode())["status"] == str(ScriptStatus.EVICTED_TTL)


async def test_python_writes_records_lua_reads() -> None:
    band = contract.BAND_CONFIG.encode("rr", "wa", 3, 4, 0.4, 0.4, 0.2, 60.0, 100.0, 0.25)
    got = await _lua(f"local b = parse_band('{band}') return {{ b.fair, b.order, fmt(b.aging) }}")
    assert [x.decode() for x in got] == ["rr", "wa", "0.25"]
    # Every status and policy code the scripts name is defined as Python has it (the include
    # defines no other: each is one of the library's 200 locals).
    codes = {name: code for name, code in lua_codes().items() if name in names_used_by_scripts()}
    assert {"S_DISPATCHED", "S_NO_CONFIG", "S_LAYOUT_MISMATCH", "FAIR_RR", "ORDER_WA"} <= set(codes)
    got = await _lua("return { " + ", ".join(f"tostring({name})" for name in codes) + " }")
    assert [x.decode() for x in got] == [code.strip("'") for code in codes.values()]


# --- What the scripts write is the documented layout ------------------------------------------

_ID = re.compile(r"[A-Za-z0-9._%-]+")


def _spec(suffix: str) -> contract.KeySpec:
    for spec in KEYS:
        if suffix == spec.suffix or (
            spec.suffix.endswith(":") and suffix.startswith(spec.suffix) and suffix != spec.suffix
        ):
            return spec
    raise AssertionError(f"undocumented key suffix {suffix!r}")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _check_layout(store: PoolStore, seen: set[str]) -> None:
    client = store.client
    for raw_key in await client.keys("*"):
        key = _text(raw_key)
        assert key.startswith(store.prefix), key
        suffix = key[len(store.prefix) :]
        spec = _spec(suffix)
        seen.add(spec.name)
        rest = suffix[len(spec.suffix) :]
        kind = _text(await client.type(key))
        # An edf lane is a zset by deadline; fcfs and workload-aware lanes are lists.
        assert kind == spec.kind or (spec.suffix == contract.LANE and kind == "zset"), key
        if spec.suffix in (contract.FLOWS, contract.ITEMS, contract.HELD, contract.DEADLINES):
            int(rest)
        elif spec.suffix in (contract.RANK, contract.GROUP):
            rest, _, wid = rest.partition(contract.GROUP_SEP)
            assert (wid != "") == (spec.suffix == contract.GROUP), key
            band, _, flow = rest.partition(contract.RANK_FLOW_SEP)
            int(band)
            assert flow == "" or _ID.fullmatch(flow), key
        elif spec.suffix == contract.LANE:
            contract.LANE_ID.parse(rest)
        elif spec.suffix.endswith(":"):
            assert _ID.fullmatch(rest), key
        await _check_content(client, spec, key)
    await _check_groups(store)


async def _check_groups(store: PoolStore) -> None:
    """A workload's best lane in a ranking set counts its queued lanes there, and its group zset
    exists exactly when there are two or more, holding one member per lane."""
    client, prefix = store.client, store.prefix
    lanes: dict[tuple[str, str], int] = {}  # (workload, ranking set suffix) -> queued lanes
    for raw_key in await client.keys(prefix + contract.LANE + "*"):
        parts = contract.LANE_ID.parse(_text(raw_key)[len(prefix + contract.LANE) :])
        if parts.get("wid"):
            for suffix in (parts["band"], parts["band"] + contract.RANK_FLOW_SEP + parts["flow"]):
                lanes[parts["wid"], suffix] = lanes.get((parts["wid"], suffix), 0) + 1
    for raw_key in await client.keys(prefix + contract.WORKLOAD + "*"):
        wid = _text(raw_key)[len(prefix + contract.WORKLOAD) :]
        for f, v in (await client.hgetall(raw_key)).items():
            field, value = _text(f), _text(v)
            if not field.startswith(contract.WGROUP_FIELD) or not value:
                continue
            suffix = field[len(contract.WGROUP_FIELD) :]
            n = contract.split_best(value)[2]
            assert n == lanes.get((wid, suffix)), (wid, suffix, n)
            group = prefix + contract.GROUP + suffix + contract.GROUP_SEP + wid
            assert await client.zcard(group) == (n if n >= 2 else 0), (wid, suffix, n)


def _check_hash(spec: contract.KeySpec, key: str, fields: dict[str, str]) -> None:
    stems = {contract.POOL: contract.POOL_STEMS, contract.WORKLOAD: (contract.WGROUP_FIELD,)}
    stems[contract.ANON] = stems[contract.WORKLOAD]
    if spec.fields:
        extra = {f for f in fields if not f.startswith(stems.get(spec.suffix, ()))}
        assert extra <= set(spec.fields), (key, extra - set(spec.fields))
    records = {contract.HELD: contract.HELD_RECORD, contract.LEASED: contract.LEASED_RECORD}
    for f, v in fields.items():
        if spec.suffix == contract.POOL and f.startswith(contract.CFG_BAND):
            contract.BAND_CONFIG.parse(v)
        elif spec.suffix == contract.ITEMS:
            assert 0 <= int(f) < contract.ITEM_BUCKET, key
            contract.ITEM.parse(v)
        elif spec.suffix == contract.HELD and f == contract.POOL_LAYOUT:
            assert len(v) > 64, key  # longer than hash-max-listpack-value
        elif spec.suffix in records:
            assert f.isdigit() and len(f) == contract.ID_WIDTH, key
            records[spec.suffix].parse(v)
        elif f.startswith(contract.WGROUP_FIELD):
            band, _, flow = f[len(contract.WGROUP_FIELD) :].partition(contract.RANK_FLOW_SEP)
            int(band)
            if v:
                assert re.fullmatch(r"-?\d+", v.partition(contract.SEP)[0]), (key, v)
                lane = contract.LANE_ID.parse(
                    contract.split_rank_member(contract.split_best(v)[1])[1]
                )
                assert lane["band"] == band and flow in ("", lane["flow"]), key


async def _check_content(client: Any, spec: contract.KeySpec, key: str) -> None:
    if spec.kind == "hash":
        fields = {_text(k): _text(v) for k, v in (await client.hgetall(key)).items()}
        _check_hash(spec, key, fields)
    elif spec.suffix in (contract.RANK, contract.GROUP):
        for member, score in await client.zrange(key, 0, -1, withscores=True):
            head, lane = contract.split_rank_member(_text(member))
            assert head.isdigit(), key
            contract.LANE_ID.parse(lane)
            # Rank keys are whole numbers (contract.RANK_KEY_SCALE): listpack integers.
            assert score == int(score), (key, score)
    elif spec.suffix == contract.INBOX:
        for msg in await client.lrange(key, 0, -1):
            ScriptStatus(int(contract.DELIVERY.parse(_text(msg))["status"]))


@pytest.mark.parametrize("hold_tickets", [False, True])
async def test_scripts_write_exactly_the_documented_keys(hold_tickets: bool) -> None:
    server = fakeredis.FakeServer()
    bands = {
        "priorityBands": [
            {
                "priority": 1,
                "fairnessPolicy": {"type": "round-robin-fairness-policy"},
                "orderingPolicy": {"type": "edf-ordering-policy"},
            },
            {"priority": -1, "orderingPolicy": {"type": "fcfs-ordering-policy"}},
        ]
    }
    config = make_config(limit=1, flowControl=bands)
    stores = [
        PoolStore(fakeredis.FakeAsyncRedis(server=server), config, rid, coalesce=False)
        for rid in ("r1", "r2")
    ]
    r1, r2 = stores
    seen: set[str] = set()
    lease = 5000 if hold_tickets else 0
    args = {"criticality": 3, "byte_size": 10, "ttl_ms": 60_000}
    await r1.configure(now=0)
    for s in stores:
        await s.heartbeat(10_000, now=10)
    team = escape_id("team/a")
    holder = await r1.enqueue(now=20, band=0, flow="f", workload=team, **args)
    await _check_layout(r1, seen)
    await r2.enqueue(now=30, band=0, flow="f", workload=team, **{**args, "criticality": 4})
    # A second lane of the workload in the same ranking set: its group gets a zset.
    await r1.enqueue(now=35, band=0, flow="f", workload=team, **{**args, "criticality": 2})
    await r2.enqueue(now=40, band=1, flow=escape_id("x/y"), workload="", **args)
    await r1.enqueue(now=50, band=1, flow="z", workload="", **args)
    await r1.enqueue(now=60, band=-1, flow="f", workload="", lease_ms=lease, **args)
    await _check_layout(r1, seen)
    current, now = holder.item_id, 100
    for _ in range(5):
        # Only the replica holding a slot (or anyone, for a ticket's) releases it.
        replies = [await s.release(current, now=now) for s in stores]
        assert ScriptStatus.DISPATCHED in {r.status for r in replies}
        await _check_layout(r1, seen)
        current = next(iter(await inflight_records(r1.client, r1.prefix)))
        now += 100
    await r1.maintain(1000, force=True, now=now)
    await _check_layout(r1, seen)
    # Every documented key was written at some point of the scenario (leases only by tickets).
    # The scrape lease is the utilization detector's (tests/test_telemetry_scraper.py).
    expected = (
        {k.name for k in KEYS} - {"SCRAPE"} - (set() if hold_tickets else {"LEASES", "LEASED"})
    )
    assert seen == expected
    for s in stores:
        await s.client.aclose()


async def test_remembered_numbers_read_and_format_as_tonumber_and_int_would() -> None:
    """int and tonum (the contract include) remember numbers' text and number as they meet them;
    every value must come out as string.format('%d') and tonumber give it, whatever was
    remembered before (the same library serves every call)."""
    texts = ["0", "7", "007", "1023", "1024", "-1", "2.5", "1e3", "", "abc", " 5"]
    numbers = [0, 7, 1023, 1024, -1, 2.5, 1e15, -0.0]
    body = (
        "local out = {}\n"
        f"for round = 1, 2 do\n"
        f"  for _, t in ipairs({{ {', '.join(repr(t) for t in texts)} }}) do\n"
        "    out[#out + 1] = tostring(tonum(t)) == tostring(tonumber(t))"
        " and (NUMBER_OF[t] or tonum(t)) == tonumber(t)\n"
        "  end\n"
        f"  for _, n in ipairs({{ {', '.join(repr(n) for n in numbers)} }}) do\n"
        "    out[#out + 1] = int(n) == string.format('%d', n)"
        " and (TEXT_OF[n] or int(n)) == string.format('%d', n)\n"
        "  end\n"
        "end\n"
        "out[#out + 1] = tonum(nil) == nil and tonum(false) == nil\n"
        "local failed = {}\n"
        "for i, ok in ipairs(out) do if not ok then failed[#failed + 1] = i end end\n"
        "return failed\n"
    )
    assert await _lua(body) == []


async def test_remembered_numbers_stay_right_past_the_bound() -> None:
    """int and tonum forget every number they remember once they hold REMEMBERED_NUMBERS; a
    number met before and after that, and a text int would write otherwise ('1e6'), still come
    out as string.format('%d') and tonumber give them."""
    body = (
        "local failed = {}\n"
        f"for i = 1, {3 * REMEMBERED_NUMBERS} do\n"
        "  local n = 1000000 + (i % 1500) * 7\n"
        "  local text = int(n)\n"
        "  if text ~= string.format('%d', n) or tonum(text) ~= n then failed[#failed + 1] = i end\n"
        "  if tonum('1e6') ~= 1e6 or int(1e6) ~= '1000000' then failed[#failed + 1] = -i end\n"
        "end\n"
        "return failed\n"
    )
    assert await _lua(body) == []
    # -0 formats as '0', which is read back as 0, not -0. (Made at run time: Lua's compiler
    # merges the constant -0.0 with a 0 the chunk has.)
    body = "local zero = 0 local z = int(-zero) return { z, tostring(tonum('0')) }"
    assert await _lua(body) == [b"0", b"0"]
