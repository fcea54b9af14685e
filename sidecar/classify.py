"""Decode a request's classification headers into a FlowControlRequest (DESIGN §3).

Lenient mode falls back to a default for every missing or malformed header and never raises.
Strict mode raises HeaderError for a header that is present but malformed, so the HTTP surface can
answer 400 naming the header; a header that is simply absent gets its default in both modes.
"""

from __future__ import annotations

import itertools
import math
import re
import uuid
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import ParamSpec, TypeVar

import msgspec

from sidecar.keys import VALID_ID, is_valid_id
from sidecar.request import DEFAULT_FLOW, FlowControlRequest
from sidecar.workload import (
    DEFAULT_CRITICALITY,
    MAX_CRITICALITY,
    MIN_CRITICALITY,
    WorkloadContext,
    normalise_criticality,
)

WORKLOAD_CONTEXT_HEADER = "x-workload-context"
WORKLOAD_ID_HEADER = "x-workload-id"
CRITICALITY_HEADER = "x-workload-criticality"
REQUEST_ID_HEADER = "x-request-id"
# llm-d's names (llm-d/llm-d-router pkg/epp/metadata/consts.go: FlowFairnessIDKey, ObjectiveKey).
FAIRNESS_ID_HEADER = "x-llm-d-inference-fairness-id"
OBJECTIVE_HEADER = "x-llm-d-inference-objective"
# Per-request queue TTL: "250ms", "5s", "2m", "1h", or a bare number of seconds ("1.5"). It can only
# shorten the wait: the result is capped by the configured maximum. llm-d has no per-request TTL
# header (consts.go lists none); this one takes llm-d's naming so all three read alike.
TTL_HEADER = "x-llm-d-inference-ttl"
# The time-to-first-token objective in ms, which slo-deadline ordering orders by (llm-d's
# consts.go TTFTSLOHeaderKey, old name OldTTFTSLOHeaderKey).
SLO_TTFT_HEADER = "x-llm-d-slo-ttft-ms"
# The older Gateway API Inference Extension names, still read. As in llm-d (consts.go
# headerAliases), the current name wins when both are sent and the old one is then not read at all.
OLD_NAMES: Mapping[str, str] = {
    FAIRNESS_ID_HEADER: "x-gateway-inference-fairness-id",
    OBJECTIVE_HEADER: "x-gateway-inference-objective",
    TTL_HEADER: "x-gateway-inference-ttl",
    SLO_TTFT_HEADER: "x-slo-ttft-ms",
}

_OLD_OBJECTIVE = OLD_NAMES[OBJECTIVE_HEADER]
_OLD_FAIRNESS_ID = OLD_NAMES[FAIRNESS_ID_HEADER]
_OLD_TTL = OLD_NAMES[TTL_HEADER]
_OLD_SLO_TTFT = OLD_NAMES[SLO_TTFT_HEADER]

# Headers meant for the sidecar alone; stripped before forwarding, under both names. x-request-id is
# not among them: it travels upstream and is echoed back.
CONTROL_HEADERS: frozenset[str] = frozenset(
    {
        WORKLOAD_CONTEXT_HEADER,
        WORKLOAD_ID_HEADER,
        CRITICALITY_HEADER,
        *OLD_NAMES.keys(),
        *OLD_NAMES.values(),
    }
)

# A longer value is malformed: no legitimate classification header comes near it, and the cap bounds
# the work spent decoding attacker-supplied text.
MAX_HEADER_CHARS = 8 * 1024

_ID_RULE = f"must match {VALID_ID.pattern}"
_CRITICALITY_RULE = f"must be an integer from {MIN_CRITICALITY} to {MAX_CRITICALITY}"
_TTL_RULE = 'expected a duration such as "250ms", "5s", "1m30s", "1h" or "1.5" (seconds)'
# ASCII digits only: int() and Fraction() would also accept other scripts' digits and underscores.
_INTEGER = re.compile(r"[+-]?[0-9]{1,9}")
_NUMBER = r"[0-9]{1,15}(?:\.[0-9]{1,9})?|\.[0-9]{1,9}"
# Go duration syntax as well (llm-d parses x-llm-d-inference-ttl with it: "1m30s", "1500us"), with
# at most 8 parts; "µs" and "μs" are Go's spellings of "us".
_UNIT = r"ms|us|µs|μs|ns|s|m|h"
_SECONDS = re.compile(_NUMBER)
_DURATION = re.compile(f"(?:(?:{_NUMBER})(?:{_UNIT})){{1,8}}")
_PART = re.compile(f"({_NUMBER})({_UNIT})")
_MICRO = Fraction(1, 1_000)
_UNIT_MS: dict[str, Fraction | int] = {
    "h": 3_600_000,
    "m": 60_000,
    "s": 1_000,
    "ms": 1,
    **dict.fromkeys(("us", "µs", "μs"), _MICRO),
    "ns": _MICRO * _MICRO,
}

_T = TypeVar("_T")
_P = ParamSpec("_P")


class HeaderError(ValueError):
    """A classification header is present but malformed (raised in strict mode only)."""

    def __init__(self, header: str, reason: str) -> None:
        super().__init__(header, reason)
        self.header = header
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.header}: {self.reason}"


class _WireContext(msgspec.Struct):
    """x-workload-context on the wire; criticality is checked by hand so a bad one keeps the id."""

    workload_id: str
    criticality: object = msgspec.UNSET


_CONTEXT_DECODER = msgspec.json.Decoder(_WireContext)


def classify(
    headers: Mapping[str, str],
    *,
    pool: str,
    objectives: Mapping[str, int],
    default_ttl_ms: int,
    max_ttl_ms: int,
    strict: bool,
    byte_size: int = 0,
    model: str = "",
    request_id_factory: Callable[[], str] | None = None,
) -> FlowControlRequest:
    """Build the request the flow controller admits from the incoming headers.

    ``headers`` is looked up by lower-case name, so a case-insensitive multidict or a dict with
    lower-case keys both work. Raises HeaderError only when ``strict`` is true.
    """
    default_ttl = min(default_ttl_ms, max_ttl_ms)
    # Most classification headers are absent from most requests: one lookup finds that out, and
    # only a header that is there goes through its parser (which yields the same default when
    # it is not). This is on every proxied request's path.
    present = headers.get
    request_id = None
    if present(REQUEST_ID_HEADER) is not None:
        request_id = _or_default(strict, None, _request_id, headers)
    objective, priority = "", 0
    if present(OBJECTIVE_HEADER) is not None or present(_OLD_OBJECTIVE) is not None:
        objective, priority = _or_default(strict, ("", 0), _objective, headers, objectives)
    fairness_id = DEFAULT_FLOW
    if present(FAIRNESS_ID_HEADER) is not None or present(_OLD_FAIRNESS_ID) is not None:
        fairness_id = _or_default(strict, DEFAULT_FLOW, _fairness_id, headers)
    ttl_ms = default_ttl
    if present(TTL_HEADER) is not None or present(_OLD_TTL) is not None:
        ttl_ms = _or_default(strict, default_ttl, _ttl_ms, headers, default_ttl, max_ttl_ms)
    slo_ttft_ms = 0
    if present(SLO_TTFT_HEADER) is not None or present(_OLD_SLO_TTFT) is not None:
        slo_ttft_ms = _or_default(strict, 0, _slo_ttft_ms, headers)
    return FlowControlRequest(
        request_id=request_id or (request_id_factory or _new_request_id)(),
        fairness_id=fairness_id,
        priority=priority,
        byte_size=byte_size,
        pool=pool,
        model=model,
        objective=objective,
        ttl_ms=ttl_ms,
        workload=parse_workload(headers, strict),
        slo_ttft_ms=slo_ttft_ms,
    )


def parse_workload(headers: Mapping[str, str], strict: bool) -> WorkloadContext | None:
    """The workload a request belongs to, or None for anonymous traffic.

    A usable x-workload-context wins over x-workload-id / x-workload-criticality. In lenient mode an
    unusable one is ignored and the separate headers are consulted instead.
    """
    present = headers.get  # as in classify: absent headers skip their parsers
    if present(WORKLOAD_CONTEXT_HEADER) is not None:
        try:
            raw = _header(headers, WORKLOAD_CONTEXT_HEADER)
            if raw is not None:
                return _decode_context(raw, strict)
        except HeaderError:
            if strict:
                raise
    criticality = DEFAULT_CRITICALITY
    if present(CRITICALITY_HEADER) is not None:
        criticality = _or_default(strict, DEFAULT_CRITICALITY, _separate_criticality, headers)
    if present(WORKLOAD_ID_HEADER) is None:
        return None
    workload_id = _or_default(strict, None, _id_header, headers, WORKLOAD_ID_HEADER)
    # No usable id means anonymous: never mint one, or every request would create a registry entry.
    return None if workload_id is None else WorkloadContext(workload_id, criticality)


def _or_default(
    strict: bool, default: _T, parse: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
) -> _T:
    """Run one header parser; a malformed header yields ``default`` unless strict."""
    try:
        return parse(*args, **kwargs)
    except HeaderError:
        if strict:
            raise
        return default


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """The single value of a header, None when absent; HeaderError when repeated or oversized."""
    value = headers.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise HeaderError(name, "value is not text")
    # A multidict keeps repeated headers apart; which copy to believe is ambiguous, so neither is.
    getall = getattr(headers, "getall", None)
    if getall is not None and len(getall(name, ())) > 1:
        raise HeaderError(name, "header is repeated")
    if len(value) > MAX_HEADER_CHARS:
        raise HeaderError(name, f"value is longer than {MAX_HEADER_CHARS} characters")
    # Optional whitespace around a field value is not part of it (RFC 9110 §5.5).
    return value.strip(" \t")


def _aliased(headers: Mapping[str, str], name: str) -> tuple[str, str | None]:
    """(the name it came under, value) of a header that also has an old name; the llm-d name is
    looked up first, so an error names the header the client actually sent."""
    for candidate in (name, OLD_NAMES[name]):
        value = _header(headers, candidate)
        if value is not None:
            return candidate, value
    return name, None


def _checked_id(name: str, value: str | None) -> str | None:
    if value is not None and not is_valid_id(value):
        raise HeaderError(name, _ID_RULE)
    return value


def _id_header(headers: Mapping[str, str], name: str) -> str | None:
    return _checked_id(name, _header(headers, name))


def _request_id(headers: Mapping[str, str]) -> str | None:
    return _id_header(headers, REQUEST_ID_HEADER)


def _fairness_id(headers: Mapping[str, str]) -> str:
    return _checked_id(*_aliased(headers, FAIRNESS_ID_HEADER)) or DEFAULT_FLOW


def _objective(headers: Mapping[str, str], objectives: Mapping[str, int]) -> tuple[str, int]:
    header, name = _aliased(headers, OBJECTIVE_HEADER)
    if name is None:
        return "", 0
    priority = objectives.get(name)
    if priority is None:
        raise HeaderError(header, "unknown objective")
    return name, priority


def _ttl_ms(headers: Mapping[str, str], default_ms: int, max_ms: int) -> int:
    header, value = _aliased(headers, TTL_HEADER)
    if value is None:
        return default_ms
    # Fraction keeps "0.1" exact, so rounding up to whole milliseconds never adds one spuriously.
    if _SECONDS.fullmatch(value):
        ms = Fraction(value) * 1_000
    elif _DURATION.fullmatch(value):
        ms = sum((Fraction(n) * _UNIT_MS[unit] for n, unit in _PART.findall(value)), Fraction())
    else:
        raise HeaderError(header, _TTL_RULE)
    if ms <= 0:
        raise HeaderError(header, "duration must be greater than zero")
    # Round up so a positive sub-millisecond TTL does not become zero.
    return min(math.ceil(ms), max_ms)


def _slo_ttft_ms(headers: Mapping[str, str]) -> int:
    """Milliseconds, a positive number (llm-d reads it as a float); rounded up to whole ms."""
    header, value = _aliased(headers, SLO_TTFT_HEADER)
    if value is None:
        return 0
    try:
        ms = float(value)
    except ValueError:
        raise HeaderError(header, "must be a number of milliseconds") from None
    if not (math.isfinite(ms) and ms > 0):
        raise HeaderError(header, "must be a number of milliseconds greater than zero")
    return min(math.ceil(ms), 2**31)


def _decode_context(raw: str, strict: bool) -> WorkloadContext:
    try:
        wire = _CONTEXT_DECODER.decode(raw)
    # UnicodeError: a lone surrogate cannot be encoded; RecursionError: absurdly deep nesting.
    except (msgspec.MsgspecError, UnicodeError, RecursionError) as exc:
        reason = f"expected a JSON object with a string workload_id: {exc}"
        raise HeaderError(WORKLOAD_CONTEXT_HEADER, reason) from None
    if not is_valid_id(wire.workload_id):
        raise HeaderError(WORKLOAD_CONTEXT_HEADER, f"workload_id {_ID_RULE}")
    if wire.criticality is msgspec.UNSET:
        return WorkloadContext(wire.workload_id, DEFAULT_CRITICALITY)
    criticality = normalise_criticality(wire.criticality)
    # The type test matters: 3.0 == 3, yet a float is not a valid criticality (nor is true == 1).
    if strict and (type(wire.criticality) is not int or criticality != wire.criticality):
        raise HeaderError(WORKLOAD_CONTEXT_HEADER, f"criticality {_CRITICALITY_RULE}")
    return WorkloadContext(wire.workload_id, criticality)


def _separate_criticality(headers: Mapping[str, str]) -> int:
    value = _header(headers, CRITICALITY_HEADER)
    if value is None:
        return DEFAULT_CRITICALITY
    if _INTEGER.fullmatch(value) is None:
        raise HeaderError(CRITICALITY_HEADER, _CRITICALITY_RULE)
    criticality = int(value)
    if normalise_criticality(criticality) != criticality:
        raise HeaderError(CRITICALITY_HEADER, _CRITICALITY_RULE)
    return criticality


# Generated ids: a random per-process prefix and a counter. Unique like a uuid4 for our purposes
# (no two processes share a prefix in practice) and a fraction of its cost on the hot path.
_ID_PREFIX = uuid.uuid4().hex[:12]
_ID_COUNTER = itertools.count(1)


def _new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):x}"
