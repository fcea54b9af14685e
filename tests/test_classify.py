"""Request classification from headers (DESIGN §3), in lenient and strict mode."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.classify import (
    CONTROL_HEADERS,
    FAIRNESS_ID_HEADER,
    MAX_HEADER_CHARS,
    OBJECTIVE_HEADER,
    OLD_NAMES,
    SLO_TTFT_HEADER,
    TTL_HEADER,
    HeaderError,
    classify,
    parse_workload,
)
from sidecar.keys import MAX_ID_LENGTH, is_valid_id
from sidecar.request import DEFAULT_FLOW, FlowControlRequest
from sidecar.workload import WorkloadContext

CONTEXT = "x-workload-context"
WORKLOAD_ID = "x-workload-id"
CRITICALITY = "x-workload-criticality"
# The older names; the llm-d ones are tested in their own section below.
FAIRNESS = "x-gateway-inference-fairness-id"
OBJECTIVE = "x-gateway-inference-objective"
OLD_TTL = "x-gateway-inference-ttl"
OLD_SLO_TTFT = "x-slo-ttft-ms"
REQUEST_ID = "x-request-id"

OBJECTIVES = {"interactive": 10, "batch": -5, "standard": 0}
DEFAULT_TTL_MS = 30_000
MAX_TTL_MS = 60_000

# Ids that keys.is_valid_id refuses: braces would break a hash tag, the rest are not id characters.
BAD_IDS = [
    pytest.param("", id="empty"),
    pytest.param("{pool}", id="braces"),
    pytest.param("a|b", id="pipe"),
    pytest.param("team a", id="space"),
    pytest.param("line\nbreak", id="newline"),
    pytest.param("x" * (MAX_ID_LENGTH + 1), id="too-long"),
    pytest.param("x" * 10_000, id="10kb"),
    pytest.param("wörk", id="unicode"),
    pytest.param("\ud800", id="lone-surrogate"),
]
GOOD_IDS = ["a", "team:a:b", ":::", "svc/v1@prod+x=y~z.-_", "x" * MAX_ID_LENGTH]


def run(
    headers: Mapping[str, str],
    *,
    strict: bool = False,
    default_ttl_ms: int = DEFAULT_TTL_MS,
    max_ttl_ms: int = MAX_TTL_MS,
    byte_size: int = 0,
    model: str = "",
    request_id_factory: Callable[[], str] | None = None,
) -> FlowControlRequest:
    return classify(
        headers,
        pool="p1",
        objectives=OBJECTIVES,
        default_ttl_ms=default_ttl_ms,
        max_ttl_ms=max_ttl_ms,
        strict=strict,
        byte_size=byte_size,
        model=model,
        request_id_factory=request_id_factory,
    )


def context(workload_id: object, criticality: object = None) -> dict[str, str]:
    body: dict[str, object] = {"workload_id": workload_id}
    if criticality is not None:
        body["criticality"] = criticality
    return {CONTEXT: json.dumps(body)}


def header_error(headers: Mapping[str, str]) -> HeaderError:
    with pytest.raises(HeaderError) as caught:
        run(headers, strict=True)
    return caught.value


# --- no headers at all ---------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True])
def test_no_headers_is_anonymous_default_flow(strict: bool) -> None:
    request = run({}, strict=strict, byte_size=42, model="m")
    assert request.workload is None
    assert request.workload_id == ""
    assert request.fairness_id == DEFAULT_FLOW
    assert request.priority == 0
    assert request.objective == ""
    assert request.ttl_ms == DEFAULT_TTL_MS
    assert (request.pool, request.model, request.byte_size) == ("p1", "m", 42)


# --- workload context ----------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True])
def test_json_context(strict: bool) -> None:
    workload = parse_workload(context("team:a", 5), strict)
    assert workload == WorkloadContext("team:a", 5)


@pytest.mark.parametrize("strict", [False, True])
def test_json_context_without_criticality_defaults_to_3(strict: bool) -> None:
    assert parse_workload(context("a"), strict) == WorkloadContext("a", 3)


@pytest.mark.parametrize("strict", [False, True])
def test_separate_headers(strict: bool) -> None:
    headers = {WORKLOAD_ID: "svc-1", CRITICALITY: "1"}
    assert parse_workload(headers, strict) == WorkloadContext("svc-1", 1)
    assert parse_workload({WORKLOAD_ID: "svc-1"}, strict) == WorkloadContext("svc-1", 3)


@pytest.mark.parametrize("strict", [False, True])
def test_json_header_wins_over_separate_headers(strict: bool) -> None:
    headers = {**context("from-json", 4), WORKLOAD_ID: "from-header", CRITICALITY: "2"}
    assert parse_workload(headers, strict) == WorkloadContext("from-json", 4)
    # The JSON header wins as a whole: its missing criticality is not taken from the other header.
    headers = {**context("from-json"), WORKLOAD_ID: "from-header", CRITICALITY: "2"}
    assert parse_workload(headers, strict) == WorkloadContext("from-json", 3)


def test_unusable_json_falls_back_to_separate_headers_when_lenient() -> None:
    headers = {CONTEXT: "{not json", WORKLOAD_ID: "from-header", CRITICALITY: "2"}
    assert parse_workload(headers, False) == WorkloadContext("from-header", 2)
    with pytest.raises(HeaderError) as caught:
        parse_workload(headers, True)
    assert caught.value.header == CONTEXT


@pytest.mark.parametrize(
    "criticality",
    [
        pytest.param(0, id="zero"),
        pytest.param(6, id="six"),
        pytest.param(-1, id="negative"),
        pytest.param("x", id="string"),
        pytest.param("4", id="numeric-string"),
        pytest.param(3.5, id="float"),
        pytest.param(3.0, id="integral-float"),
        pytest.param(True, id="true"),
        pytest.param(10**30, id="huge"),
        pytest.param([4], id="array"),
        pytest.param({"v": 4}, id="object"),
    ],
)
def test_bad_json_criticality(criticality: object) -> None:
    headers = context("a", criticality)
    # Lenient: the id is kept, only the criticality falls back.
    assert parse_workload(headers, False) == WorkloadContext("a", 3)
    assert run(headers).criticality == 3
    error = header_error(headers)
    assert error.header == CONTEXT
    assert "criticality" in error.reason


def test_json_null_criticality_is_bad() -> None:
    headers = {CONTEXT: '{"workload_id": "a", "criticality": null}'}
    assert parse_workload(headers, False) == WorkloadContext("a", 3)
    assert header_error(headers).header == CONTEXT


@pytest.mark.parametrize("value", ["0", "6", "-3", "x", "3.5", "true", "", "٣", "4_0", "9" * 50])
def test_bad_separate_criticality(value: str) -> None:
    headers = {WORKLOAD_ID: "a", CRITICALITY: value}
    assert parse_workload(headers, False) == WorkloadContext("a", 3)
    error = header_error(headers)
    assert error.header == CRITICALITY
    assert "integer" in error.reason


def test_bad_criticality_of_an_anonymous_request_is_still_checked_when_strict() -> None:
    headers = {CRITICALITY: "9"}
    assert run(headers).workload is None
    assert header_error(headers).header == CRITICALITY


@pytest.mark.parametrize("workload_id", GOOD_IDS)
@pytest.mark.parametrize("strict", [False, True])
def test_good_workload_ids(workload_id: str, strict: bool) -> None:
    assert parse_workload(context(workload_id, 2), strict) == WorkloadContext(workload_id, 2)
    assert parse_workload({WORKLOAD_ID: workload_id}, strict) == WorkloadContext(workload_id, 3)


@pytest.mark.parametrize("workload_id", BAD_IDS)
def test_bad_workload_id_in_json(workload_id: str) -> None:
    headers = {CONTEXT: json.dumps({"workload_id": workload_id, "criticality": 5})}
    assert parse_workload(headers, False) is None
    assert header_error(headers).header == CONTEXT


@pytest.mark.parametrize("workload_id", BAD_IDS)
def test_bad_workload_id_header(workload_id: str) -> None:
    headers = {WORKLOAD_ID: workload_id, CRITICALITY: "5"}
    assert parse_workload(headers, False) is None
    error = header_error(headers)
    assert error.header == WORKLOAD_ID
    assert "must match" in error.reason or "longer than" in error.reason


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("{", id="truncated"),
        pytest.param("not json", id="text"),
        pytest.param("", id="empty"),
        pytest.param('["a", 3]', id="array"),
        pytest.param('"a"', id="string"),
        pytest.param("null", id="null"),
        pytest.param("42", id="number"),
        pytest.param('{"criticality": 3}', id="no-workload-id"),
        pytest.param('{"workload_id": 7}', id="numeric-workload-id"),
        pytest.param('{"workload_id": null}', id="null-workload-id"),
        pytest.param('{"workload_id": "a"} trailing', id="trailing-garbage"),
        pytest.param('{"workload_id": "\ud800"}', id="lone-surrogate"),
        pytest.param('{"workload_id": "a", "x": ' + "[" * 4000 + "]" * 4000 + "}", id="deep"),
    ],
)
def test_malformed_json_context(raw: str) -> None:
    headers = {CONTEXT: raw}
    assert parse_workload(headers, False) is None
    assert run(headers).workload is None
    error = header_error(headers)
    assert error.header == CONTEXT
    assert error.reason


def test_json_context_ignores_unknown_fields() -> None:
    headers = {CONTEXT: '{"workload_id": "a", "criticality": 2, "team": "x"}'}
    assert parse_workload(headers, True) == WorkloadContext("a", 2)


def test_header_whitespace_is_not_part_of_the_value() -> None:
    headers = {WORKLOAD_ID: " a\t", CRITICALITY: " 4 ", FAIRNESS: " f "}
    request = run(headers, strict=True)
    assert request.workload == WorkloadContext("a", 4)
    assert request.fairness_id == "f"


# --- fairness id ---------------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("fairness_id", GOOD_IDS)
def test_fairness_id(fairness_id: str, strict: bool) -> None:
    assert run({FAIRNESS: fairness_id}, strict=strict).fairness_id == fairness_id


@pytest.mark.parametrize("fairness_id", BAD_IDS)
def test_bad_fairness_id(fairness_id: str) -> None:
    headers = {FAIRNESS: fairness_id}
    assert run(headers).fairness_id == DEFAULT_FLOW
    assert header_error(headers).header == FAIRNESS


# --- objective -----------------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_maps_to_priority(name: str, strict: bool) -> None:
    request = run({OBJECTIVE: name}, strict=strict)
    assert (request.objective, request.priority) == (name, OBJECTIVES[name])


@pytest.mark.parametrize("name", ["unknown", "", "Interactive", "x" * 10_000])
def test_unknown_objective(name: str) -> None:
    request = run({OBJECTIVE: name})
    # An unknown name is not kept: it would carry arbitrary header text into labels and logs.
    assert (request.objective, request.priority) == ("", 0)
    assert header_error({OBJECTIVE: name}).header == OBJECTIVE


# --- request id ----------------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True])
def test_request_id_is_taken_from_the_header(strict: bool) -> None:
    assert run({REQUEST_ID: "req-1:a"}, strict=strict).request_id == "req-1:a"


@pytest.mark.parametrize("strict", [False, True])
def test_request_id_is_generated_when_missing_but_no_workload_id_is(strict: bool) -> None:
    first, second = run({}, strict=strict), run({}, strict=strict)
    assert first.request_id != second.request_id
    assert is_valid_id(first.request_id)
    # A per-process random prefix and a counter: distinct across calls and across processes.
    assert first.request_id[:12] == second.request_id[:12]
    assert len(first.request_id) > 12
    assert first.workload is None
    assert first.workload_id == ""


def test_request_id_factory() -> None:
    assert run({}, request_id_factory=lambda: "made-here").request_id == "made-here"
    assert run({REQUEST_ID: "given"}, request_id_factory=lambda: "unused").request_id == "given"


@pytest.mark.parametrize("request_id", BAD_IDS)
def test_bad_request_id(request_id: str) -> None:
    headers = {REQUEST_ID: request_id}
    assert run(headers, request_id_factory=lambda: "fresh").request_id == "fresh"
    assert header_error(headers).header == REQUEST_ID


# --- TTL -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ttl_ms"),
    [
        ("250ms", 250),
        ("5s", 5_000),
        ("1.5", 1_500),
        ("0.1", 100),
        ("0.001", 1),
        (".5s", 500),
        ("2", 2_000),
        ("0.5m", 30_000),
        ("1.5ms", 2),  # rounded up to whole milliseconds
        # Go duration syntax, as llm-d reads x-llm-d-inference-ttl:
        ("1s500ms", 1_500),
        ("0.5m1.5s", 31_500),
        ("1500us", 2),
        ("1500µs", 2),
        ("2000000ns", 2),
        ("1m30s", MAX_TTL_MS),
        ("0.0001s", 1),  # a positive TTL never rounds down to zero
        ("2m", MAX_TTL_MS),  # 120 s, capped
        ("1h", MAX_TTL_MS),
        ("999999999999999", MAX_TTL_MS),
    ],
)
@pytest.mark.parametrize("strict", [False, True])
def test_ttl(value: str, ttl_ms: int, strict: bool) -> None:
    assert run({TTL_HEADER: value}, strict=strict).ttl_ms == ttl_ms


@pytest.mark.parametrize(
    "value",
    [
        *("", "0", "0s", "0.0ms", "-5s", "5 s", "5S", "5d", "1e3", "inf", "nan", "5.", "1m30"),
        *("0ns", "1s 500ms", "1s1s1s1s1s1s1s1s1s", "1.5.5s", "s", "ms5"),
        *("٥s", "1_0", "9" * 16, "1." + "0" * 10, "5s, 10s", "x" * (MAX_HEADER_CHARS + 1)),
    ],
)
def test_bad_ttl(value: str) -> None:
    headers = {TTL_HEADER: value}
    assert run(headers).ttl_ms == DEFAULT_TTL_MS
    error = header_error(headers)
    assert error.header == TTL_HEADER


@pytest.mark.parametrize("strict", [False, True])
def test_default_ttl_is_capped_by_the_maximum(strict: bool) -> None:
    request = run({}, strict=strict, default_ttl_ms=90_000, max_ttl_ms=MAX_TTL_MS)
    assert request.ttl_ms == MAX_TTL_MS
    bad = run({TTL_HEADER: "soon"}, default_ttl_ms=90_000, max_ttl_ms=MAX_TTL_MS)
    assert bad.ttl_ms == MAX_TTL_MS


def test_ttl_header_names_are_documented_constants() -> None:
    assert TTL_HEADER == "x-llm-d-inference-ttl"
    assert OLD_NAMES[TTL_HEADER] == OLD_TTL


# --- llm-d names and the older names -------------------------------------------------------------

# (llm-d name, old name, a good value, another good value, a malformed value, what the value sets)
_ALIASES = [
    pytest.param(
        FAIRNESS_ID_HEADER,
        FAIRNESS,
        "f-new",
        "f-old",
        "a|b",
        lambda r: r.fairness_id,
        id="fairness",
    ),
    pytest.param(
        OBJECTIVE_HEADER, OBJECTIVE, "interactive", "batch", "nope", lambda r: r.priority, id="obj"
    ),
    pytest.param(TTL_HEADER, OLD_TTL, "2s", "3s", "soon", lambda r: r.ttl_ms, id="ttl"),
    pytest.param(
        SLO_TTFT_HEADER, OLD_SLO_TTFT, "250", "500", "soon", lambda r: r.slo_ttft_ms, id="slo"
    ),
]
_Read = Callable[[FlowControlRequest], object]


def test_llm_d_header_names_are_llm_d_s() -> None:
    # llm-d/llm-d-router pkg/epp/metadata/consts.go: FlowFairnessIDKey / OldFlowFairnessIDKey,
    # ObjectiveKey / OldObjectiveKey and TTFTSLOHeaderKey / OldTTFTSLOHeaderKey. llm-d has no
    # TTL header; ours follows the same naming.
    assert OLD_NAMES == {
        "x-llm-d-inference-fairness-id": "x-gateway-inference-fairness-id",
        "x-llm-d-inference-objective": "x-gateway-inference-objective",
        "x-llm-d-inference-ttl": "x-gateway-inference-ttl",
        "x-llm-d-slo-ttft-ms": "x-slo-ttft-ms",
    }


@pytest.mark.parametrize(("new", "old", "good", "other", "bad", "read"), _ALIASES)
@pytest.mark.parametrize("strict", [False, True])
def test_either_name_alone_works_the_same(
    new: str, old: str, good: str, other: str, bad: str, read: _Read, strict: bool
) -> None:
    by_new, by_old = run({new: good}, strict=strict), run({old: good}, strict=strict)
    assert read(by_new) == read(by_old) != read(run({}, strict=strict))


@pytest.mark.parametrize(("new", "old", "good", "other", "bad", "read"), _ALIASES)
@pytest.mark.parametrize("strict", [False, True])
def test_llm_d_name_wins_when_both_are_sent(
    new: str, old: str, good: str, other: str, bad: str, read: _Read, strict: bool
) -> None:
    both = run({new: good, old: other}, strict=strict)
    assert read(both) == read(run({new: good})) != read(run({old: other}))


@pytest.mark.parametrize(("new", "old", "good", "other", "bad", "read"), _ALIASES)
def test_old_name_is_not_read_when_the_llm_d_one_is_sent(
    new: str, old: str, good: str, other: str, bad: str, read: _Read
) -> None:
    # A malformed llm-d header is not rescued by the old one (llm-d reads the first name present)...
    assert read(run({new: bad, old: other})) == read(run({}))
    assert header_error({new: bad, old: other}).header == new
    # ...and a malformed old header beside a good llm-d one is never looked at, even when strict.
    assert read(run({new: good, old: bad}, strict=True)) == read(run({new: good}))


@pytest.mark.parametrize(("new", "old", "good", "other", "bad", "read"), _ALIASES)
def test_errors_name_the_header_that_was_sent(
    new: str, old: str, good: str, other: str, bad: str, read: _Read
) -> None:
    assert header_error({old: bad}).header == old
    assert header_error({new: bad}).header == new


def test_llm_d_names_in_a_case_insensitive_multidict() -> None:
    raw = CIMultiDict(
        {
            "X-LLM-D-Inference-Fairness-Id": "flow-1",
            "X-LLM-D-Inference-Objective": "batch",
            "X-LLM-D-Inference-TTL": "250ms",
            "X-Gateway-Inference-Objective": "interactive",
        }
    )
    request = run(CIMultiDictProxy(raw), strict=True)
    assert (request.fairness_id, request.objective, request.priority) == ("flow-1", "batch", -5)
    assert request.ttl_ms == 250


# --- header containers, sizes and repeats --------------------------------------------------------


def test_case_insensitive_multidict() -> None:
    raw = CIMultiDict(
        {
            "X-Workload-Context": '{"workload_id": "a", "criticality": 4}',
            "X-Gateway-Inference-Fairness-Id": "flow-1",
            "X-Gateway-Inference-Objective": "interactive",
            "X-Request-Id": "r1",
            "X-Gateway-Inference-TTL": "2s",
        }
    )
    request = run(CIMultiDictProxy(raw), strict=True)
    assert request.workload == WorkloadContext("a", 4)
    assert (request.fairness_id, request.objective) == ("flow-1", "interactive")
    assert request.priority == 10
    assert (request.request_id, request.ttl_ms) == ("r1", 2_000)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (WORKLOAD_ID, "a"),
        (CONTEXT, '{"workload_id": "a"}'),
        (FAIRNESS, "f"),
        (OBJECTIVE, "interactive"),
        (REQUEST_ID, "r"),
        (TTL_HEADER, "1s"),
    ],
)
def test_repeated_header_is_bad(name: str, value: str) -> None:
    headers = CIMultiDictProxy(CIMultiDict([(name, value), (name, value)]))
    lenient = run(headers)
    assert lenient == run({}, request_id_factory=lambda: lenient.request_id)
    assert header_error(headers).header == name


def test_oversized_header_is_bad_even_if_it_would_parse() -> None:
    padded = '{"workload_id": "a", "criticality": 4' + " " * MAX_HEADER_CHARS + "}"
    headers = {CONTEXT: padded}
    assert parse_workload({CONTEXT: padded[: MAX_HEADER_CHARS - 1] + "}"}, True) is not None
    assert parse_workload(headers, False) is None
    error = header_error(headers)
    assert error.header == CONTEXT
    assert str(MAX_HEADER_CHARS) in error.reason


def test_control_headers() -> None:
    old = {FAIRNESS, OBJECTIVE, OLD_TTL, OLD_SLO_TTFT}
    llm_d = {FAIRNESS_ID_HEADER, OBJECTIVE_HEADER, TTL_HEADER, SLO_TTFT_HEADER}
    assert {CONTEXT, WORKLOAD_ID, CRITICALITY, *old, *llm_d} == CONTROL_HEADERS
    assert REQUEST_ID not in CONTROL_HEADERS
    assert all(name == name.lower() for name in CONTROL_HEADERS)


def test_header_error_names_the_header() -> None:
    error = HeaderError(FAIRNESS, "must match the id rule")
    assert isinstance(error, ValueError)
    assert (error.header, error.reason) == (FAIRNESS, "must match the id rule")
    assert str(error) == f"{FAIRNESS}: must match the id rule"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.header, copy.reason) == (error.header, error.reason)


def test_header_error_does_not_echo_the_value() -> None:
    secret = "<script>" + "z" * 200
    for name in (WORKLOAD_ID, FAIRNESS, OBJECTIVE, REQUEST_ID, TTL_HEADER, CRITICALITY):
        assert secret not in str(header_error({name: secret}))


# --- properties ----------------------------------------------------------------------------------

_ALL_HEADERS = sorted(CONTROL_HEADERS | {REQUEST_ID})
_ANY_TEXT = st.one_of(
    st.text(),
    st.sampled_from(["", "5s", "3", "a", "interactive", '{"workload_id": "a", "criticality": 2}']),
    st.builds(
        lambda workload_id, criticality: json.dumps(
            {"workload_id": workload_id, "criticality": criticality}
        ),
        st.text(max_size=140),
        st.one_of(st.integers(), st.floats(allow_nan=False), st.text(), st.booleans(), st.none()),
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(_ALL_HEADERS), _ANY_TEXT))
def test_lenient_never_raises_and_strict_raises_only_header_errors(
    headers: dict[str, str],
) -> None:
    request = run(headers)
    assert is_valid_id(request.request_id)
    assert is_valid_id(request.fairness_id)
    assert 1 <= request.ttl_ms <= MAX_TTL_MS
    assert request.priority == OBJECTIVES.get(request.objective, 0)
    if request.workload is not None:
        assert is_valid_id(request.workload.workload_id)
        assert 1 <= request.workload.criticality <= 5
    try:
        strict = run(headers, strict=True, request_id_factory=lambda: request.request_id)
    except HeaderError as error:
        assert error.header in headers
    else:
        # Whatever strict mode accepts, lenient mode reads the same way.
        assert strict == request
