"""Token estimate of an OpenAI-compatible chat or completion request body.

    tokens = prompt + completion
    prompt = ceil(text characters / 4) + 4 per chat message   (or exact, for token-id prompts)
    completion = max_completion_tokens, else max_tokens, else a configured default

Text is ``messages[].content`` (a string, or a list of parts of which the ``{"type": "text",
"text": ...}`` ones count) for chat, and ``prompt`` (a string, a list of strings, a list of token
ids or a list of token-id lists) for completions. A token-id prompt is counted exactly.

How wrong it is, honestly: "four characters a token" is OpenAI's rule of thumb for English with
their BPE tokenizers; the real ratio depends on the model's tokenizer and the text. English prose
is usually within about ±25 %; source code, numbers and JSON run nearer three characters a token
(the estimate is low); Chinese, Japanese and Korean run near one token a character or more (the
estimate can be four times too low). The 4 tokens a message stand in for the chat template's role
and separator tokens, which vary by model (2 to 10). Not counted: images, audio and other non-text
parts, ``tools`` / function schemas, ``tool_calls`` arguments, ``name`` fields, the system prompt a
server may add, and ``n`` > 1 (which multiplies the completion). The completion budget is an upper
bound of what the server may generate, and is usually far more than it does; a request without
one is charged the configured default, which may be too low for long generations. Use the
estimate to budget concurrency, not to bill anyone.

Hostile bodies never raise: anything that is not JSON, or holds wrong types, counts as an empty
prompt; negative numbers count as 0, and every count is clamped to ``[0, cap]``. Cost is bounded:
a body longer than ``decode_limit_bytes`` is not decoded (it is estimated from its length), the
walk over messages stops once the cap is reached, and only string lengths are added — no text is
ever joined or copied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgspec

CHARS_PER_TOKEN = 4
# Role and separator tokens a chat template adds around each message (model dependent).
MESSAGE_OVERHEAD_TOKENS = 4


class _Body(msgspec.Struct):
    """The fields the estimate reads; every other field is ignored. Typed ``Any`` so that a wrong
    type in one field is judged here (and ignored) rather than failing the whole decode."""

    messages: Any = None
    prompt: Any = None
    max_tokens: Any = None
    max_completion_tokens: Any = None


_DECODER = msgspec.json.Decoder(_Body)


@dataclass(frozen=True, slots=True)
class TokenEstimate:
    prompt: int
    completion: int

    @property
    def total(self) -> int:
        return self.prompt + self.completion


@dataclass(frozen=True, slots=True)
class TokenEstimator:
    # Completion budget of a request that names none (neither max_completion_tokens nor max_tokens).
    default_completion_tokens: int = 256
    # Upper bound of the prompt, of the completion and of their sum: no body is charged more.
    cap: int = 1_000_000
    # Bodies longer than this are estimated from their length (ceil(bytes / 4)) without decoding.
    decode_limit_bytes: int = 4 * 2**20

    def __post_init__(self) -> None:
        if self.cap < 0:
            raise ValueError(f"cap must be >= 0, got {self.cap}")
        if not 0 <= self.default_completion_tokens <= self.cap:
            raise ValueError(
                f"default_completion_tokens must be in [0, cap={self.cap}], "
                f"got {self.default_completion_tokens}"
            )
        if self.decode_limit_bytes < 0:
            raise ValueError(f"decode_limit_bytes must be >= 0, got {self.decode_limit_bytes}")

    def estimate(self, body: bytes) -> TokenEstimate:
        """Estimated prompt and completion tokens of a request body; never raises."""
        if len(body) > self.decode_limit_bytes:
            return self._sum(_ceil_div(len(body), CHARS_PER_TOKEN), self.default_completion_tokens)
        try:
            decoded = _DECODER.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            # Not JSON, not an object, a number out of range, or nested too deep.
            return self._sum(0, self.default_completion_tokens)
        prompt = self._messages_tokens(decoded.messages)
        if prompt is None:
            prompt = self._prompt_tokens(decoded.prompt)
        return self._sum(prompt or 0, self._completion_tokens(decoded))

    def total(self, body: bytes) -> int:
        """Estimated tokens of a request body (prompt + completion), in ``[0, cap]``."""
        return self.estimate(body).total

    def _sum(self, prompt: int, completion: int) -> TokenEstimate:
        prompt = self._clamp(prompt)
        completion = min(self._clamp(completion), self.cap - prompt)
        return TokenEstimate(prompt, completion)

    def _clamp(self, n: int) -> int:
        return max(0, min(n, self.cap))

    def _completion_tokens(self, body: _Body) -> int:
        for value in (body.max_completion_tokens, body.max_tokens):
            n = _count(value)
            if n is not None:
                return self._clamp(n)
        return self.default_completion_tokens

    def _messages_tokens(self, messages: Any) -> int | None:
        """Tokens of a chat ``messages`` list; None when the body has no such list."""
        if not isinstance(messages, list):
            return None
        chars = 0
        overhead = 0
        for message in messages:
            if not isinstance(message, dict):
                continue
            overhead += MESSAGE_OVERHEAD_TOKENS
            chars += _content_chars(message.get("content"))
            if _ceil_div(chars, CHARS_PER_TOKEN) + overhead >= self.cap:
                return self.cap
        return _ceil_div(chars, CHARS_PER_TOKEN) + overhead

    def _prompt_tokens(self, prompt: Any) -> int | None:
        """Tokens of a completions ``prompt``; None when the body has no usable one."""
        if isinstance(prompt, str):
            return _ceil_div(len(prompt), CHARS_PER_TOKEN)
        if not isinstance(prompt, list):
            return None
        if all(_is_token_id(t) for t in prompt):
            return len(prompt)
        chars = 0
        ids = 0
        for item in prompt:
            if isinstance(item, str):
                chars += len(item)
            elif isinstance(item, list) and all(_is_token_id(t) for t in item):
                ids += len(item)
            if _ceil_div(chars, CHARS_PER_TOKEN) + ids >= self.cap:
                return self.cap
        return _ceil_div(chars, CHARS_PER_TOKEN) + ids


DEFAULT_ESTIMATOR = TokenEstimator()


def estimate_tokens(body: bytes) -> int:
    """Estimated tokens of a request body with the default estimator (see the module docstring)."""
    return DEFAULT_ESTIMATOR.total(body)


def _content_chars(content: Any) -> int:
    """Characters of the text in one message's ``content`` (a string or a list of parts)."""
    if isinstance(content, str):
        return len(content)
    if not isinstance(content, list):
        return 0
    chars = 0
    for part in content:
        if isinstance(part, dict) and part.get("type") == "text":
            text = part.get("text")
            if isinstance(text, str):
                chars += len(text)
    return chars


def _count(value: Any) -> int | None:
    """A token count from a JSON number: ints as they are, finite floats rounded up; None for
    anything else (absent, null, bool, string, object, inf/nan)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return math.ceil(value)
    return None


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ceil_div(n: int, d: int) -> int:
    return -(-n // d)
