"""The token estimator of sidecar/tokens.py: its documented examples, and its bounds on any body."""

from __future__ import annotations

import json
import math
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.tokens import (
    DEFAULT_ESTIMATOR,
    MESSAGE_OVERHEAD_TOKENS,
    TokenEstimate,
    TokenEstimator,
    estimate_tokens,
)


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


EST = TokenEstimator(default_completion_tokens=100, cap=10_000)


# Documented examples ------------------------------------------------------------------------------


def test_chat_string_content_is_a_quarter_of_its_characters_plus_the_message_overhead() -> None:
    # 8 characters -> 2 tokens, + 4 for the message; max_tokens is the completion budget.
    assert EST.estimate(body(messages=[user("abcdefgh")], max_tokens=10)) == TokenEstimate(6, 10)
    # 9 characters round up to 3 tokens.
    assert EST.estimate(body(messages=[user("abcdefghi")], max_tokens=10)).prompt == 7


def test_every_message_adds_its_overhead_and_characters_are_summed_before_rounding() -> None:
    messages = [{"role": "system", "content": "ab"}, user("cd"), user("")]
    # 4 characters in all -> 1 token, + 3 messages x 4.
    assert EST.estimate(body(messages=messages)).prompt == 1 + 3 * MESSAGE_OVERHEAD_TOKENS


def test_only_text_parts_of_a_content_list_count() -> None:
    parts = [
        {"type": "text", "text": "abcd"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 400}},
        {"type": "text", "text": "efghi"},
        {"type": "text", "text": 12345},  # not a string: ignored
        "stray",  # not a part: ignored
    ]
    assert EST.estimate(body(messages=[user(parts)])).prompt == math.ceil(9 / 4) + 4


def test_a_message_without_text_content_still_costs_its_overhead() -> None:
    messages = [{"role": "assistant", "tool_calls": []}, user(None), "not a message"]
    assert EST.estimate(body(messages=messages)).prompt == 2 * MESSAGE_OVERHEAD_TOKENS


def test_completion_prompt_as_string_list_of_strings_and_token_ids() -> None:
    assert EST.estimate(body(prompt="abcdefgh")).prompt == 2
    # Strings of a list are summed, then rounded up once.
    assert EST.estimate(body(prompt=["abc", "de"])).prompt == 2
    # Token ids are counted exactly.
    assert EST.estimate(body(prompt=[11, 22, 33])).prompt == 3
    assert EST.estimate(body(prompt=[[1, 2], [3, 4, 5]])).prompt == 5
    assert EST.estimate(body(prompt=[])).prompt == 0


def test_messages_win_over_prompt() -> None:
    assert EST.estimate(body(messages=[user("abcd")], prompt="x" * 400)).prompt == 1 + 4


def test_max_completion_tokens_wins_then_max_tokens_then_the_default() -> None:
    assert EST.estimate(body(max_completion_tokens=7, max_tokens=9)).completion == 7
    assert EST.estimate(body(max_completion_tokens=None, max_tokens=9)).completion == 9
    assert EST.estimate(body(max_completion_tokens="7", max_tokens=9)).completion == 9
    assert EST.estimate(body(prompt="abcd")).completion == 100
    assert TokenEstimator(default_completion_tokens=5).estimate(body()).completion == 5


def test_budget_numbers_are_clamped_rounded_up_and_wrong_types_ignored() -> None:
    assert EST.estimate(body(max_tokens=-50)).completion == 0
    assert EST.estimate(body(max_tokens=10**40)).completion == EST.cap
    assert EST.estimate(body(max_tokens=2.1)).completion == 3
    assert EST.estimate(body(max_tokens=-0.5)).completion == 0
    assert EST.estimate(body(max_tokens=1e300)).completion == EST.cap
    for wrong in (True, "12", [12], {"n": 12}):
        assert EST.estimate(body(max_tokens=wrong)).completion == 100, wrong


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00",
        b"[1, 2, 3]",
        b'"a string"',
        b"null",
        b'{"messages": [',
        b'{"max_tokens": 1e400}',  # out of a double's range
        b"[" * 100_000 + b"]" * 100_000,  # deeper than any decoder recurses
        b'{"messages": "hello", "prompt": {"text": "x"}}',
    ],
)
def test_hostile_bodies_count_as_an_empty_prompt_with_the_default_budget(raw: bytes) -> None:
    assert EST.estimate(raw) == TokenEstimate(0, 100)


def test_the_cap_bounds_the_prompt_and_the_sum() -> None:
    est = TokenEstimator(default_completion_tokens=10, cap=50)
    huge = est.estimate(body(messages=[user("x" * 1000)] * 3, max_tokens=40))
    assert huge == TokenEstimate(50, 0)
    # Many empty messages reach the cap through their overhead alone.
    assert est.estimate(body(messages=[user("")] * 100)).prompt == 50
    assert est.estimate(body(prompt=list(range(500)))).prompt == 50
    assert est.estimate(body(prompt=["x" * 400, [1] * 500])).prompt == 50
    assert est.estimate(body(prompt="ab", max_tokens=49)) == TokenEstimate(1, 49)
    assert est.estimate(body(prompt="ab", max_tokens=60)) == TokenEstimate(1, 49)


def test_a_body_over_the_decode_limit_is_estimated_from_its_length_without_decoding() -> None:
    est = TokenEstimator(default_completion_tokens=100, decode_limit_bytes=1000)
    raw = body(messages=[user("y" * 2000)], max_tokens=1)
    # Not decoded: max_tokens=1 is never seen, so the default budget applies.
    assert est.estimate(raw) == TokenEstimate(math.ceil(len(raw) / 4), 100)
    assert est.estimate(b"\x00" * 1001).prompt == math.ceil(1001 / 4)


def test_estimate_tokens_uses_the_default_estimator() -> None:
    raw = body(messages=[user("hello there")], max_tokens=20)
    assert estimate_tokens(raw) == DEFAULT_ESTIMATOR.total(raw) == 3 + 4 + 20
    assert estimate_tokens(b"{}") == DEFAULT_ESTIMATOR.default_completion_tokens


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cap": -1},
        {"default_completion_tokens": -1},
        {"default_completion_tokens": 11, "cap": 10},
        {"decode_limit_bytes": -1},
    ],
)
def test_a_bad_configuration_is_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        TokenEstimator(**kwargs)


# Properties ---------------------------------------------------------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=50)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=30,
)
PARTS = st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", 3]), "text": JSON_VALUES})
    | JSON_VALUES,
    max_size=5,
)
MESSAGES = st.lists(
    st.fixed_dictionaries({"role": JSON_VALUES, "content": st.text(max_size=200) | PARTS})
    | JSON_VALUES,
    max_size=8,
)
# OpenAI-shaped bodies whose every field may hold the wrong type or an absurd number.
SHAPED_BODIES = st.fixed_dictionaries(
    {},
    optional={
        "messages": MESSAGES | JSON_VALUES,
        "prompt": st.text(max_size=200)
        | st.lists(st.text(max_size=50) | st.integers() | st.lists(st.integers()), max_size=5)
        | JSON_VALUES,
        "max_tokens": JSON_SCALARS | st.integers(),
        "max_completion_tokens": JSON_SCALARS | st.integers(),
    },
)
ESTIMATORS = st.builds(
    TokenEstimator,
    default_completion_tokens=st.integers(0, 300),
    cap=st.integers(300, 5000),
    decode_limit_bytes=st.integers(0, 4000),
)


def assert_bounded(estimate: TokenEstimate, est: TokenEstimator) -> None:
    assert type(estimate.prompt) is int and type(estimate.completion) is int
    assert 0 <= estimate.prompt <= est.cap
    assert 0 <= estimate.completion <= est.cap
    assert 0 <= estimate.total <= est.cap


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=300), est=ESTIMATORS)
def test_any_bytes_are_estimated_within_bounds(raw: bytes, est: TokenEstimator) -> None:
    assert_bounded(est.estimate(raw), est)


@settings(max_examples=300, deadline=None)
@given(value=JSON_VALUES, est=ESTIMATORS)
def test_any_json_value_is_estimated_within_bounds(value: Any, est: TokenEstimator) -> None:
    assert_bounded(est.estimate(msgspec.json.encode(value)), est)


@settings(max_examples=300, deadline=None)
@given(fields=SHAPED_BODIES, est=ESTIMATORS)
def test_any_shaped_body_is_estimated_within_bounds(
    fields: dict[str, Any], est: TokenEstimator
) -> None:
    assert_bounded(est.estimate(msgspec.json.encode(fields)), est)


@settings(max_examples=200, deadline=None)
@given(
    contents=st.lists(st.text(max_size=100), max_size=10),
    max_tokens=st.none() | st.integers(min_value=0, max_value=5000),
)
def test_well_formed_chat_bodies_follow_the_documented_formula(
    contents: list[str], max_tokens: int | None
) -> None:
    fields: dict[str, Any] = {"model": "m", "messages": [user(c) for c in contents]}
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    chars = sum(len(c) for c in contents)
    prompt = math.ceil(chars / 4) + MESSAGE_OVERHEAD_TOKENS * len(contents)
    completion = EST.default_completion_tokens if max_tokens is None else max_tokens
    expected_prompt = min(prompt, EST.cap)
    expected = TokenEstimate(expected_prompt, min(completion, EST.cap - expected_prompt))
    assert EST.estimate(msgspec.json.encode(fields)) == expected


@settings(max_examples=200, deadline=None)
@given(contents=st.lists(st.text(max_size=100), max_size=8), extra=st.text(max_size=100))
def test_one_more_message_never_lowers_the_prompt_estimate(contents: list[str], extra: str) -> None:
    before = EST.estimate(body(messages=[user(c) for c in contents])).prompt
    after = EST.estimate(body(messages=[user(c) for c in [*contents, extra]])).prompt
    assert after >= before
