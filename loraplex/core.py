"""Shared nouns: what a request asks for and what comes back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from loraplex.config import (GREEDY_BELOW_TEMPERATURE, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS,
                             MIN_REPETITION_PENALTY)
from loraplex.errors import LoraplexError

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass
class SamplingParams:
    """How one request is decoded.

    A temperature below GREEDY_BELOW_TEMPERATURE (1e-5; 0 included) is greedy: the limit of
    sampling as the temperature goes to 0, without dividing logits by a number that underflows.
    `top_k <= 0` and `top_p == 1` disable those filters; the nucleus of any `top_p` holds at
    least the most likely token.
    `repetition_penalty` (HF/CTRL style, >1 discourages) applies to prompt and output tokens;
    `frequency_penalty` and `presence_penalty` (OpenAI style) apply to output tokens only.
    `logprobs=True` returns, per sampled token, the log-softmax of the raw logits at that token;
    `top_logprobs=k` (0..MAX_TOP_LOGPROBS, implies logprobs) also the k most likely tokens' ones.
    `stop`: at most MAX_STOP_STRINGS strings of at most MAX_STOP_STRING_CHARS characters.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        if len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_STRING_CHARS} characters")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k is None:
            self.top_k = 0
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be an integer >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (isinstance(self.top_k, int), "top_k must be an integer"),
            (self.repetition_penalty >= MIN_REPETITION_PENALTY,
             f"repetition_penalty must be >= {MIN_REPETITION_PENALTY}"),
            (isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
             f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (self.seed is None or isinstance(self.seed, int), "seed must be an integer"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.top_logprobs:
            self.logprobs = True

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def longest_stop(self) -> int:
        """Characters of the longest stop string (0 without any)."""
        return max(map(len, self.stop), default=0)


@dataclass
class RequestOutput:
    """The result of one request (or its state so far, while streaming).

    `text` is the detokenized `token_ids`, with a matched stop string cut off.
    `logprobs[i]` belongs to `token_ids[i]`; None unless the request asked for logprobs.
    `top_logprobs[i]`: the `params.top_logprobs` most likely tokens at step i as {token id:
    logprob}, most likely first; None unless asked for.
    `num_generated_tokens` counts `token_ids` but not a final end-of-sequence or stop token id
    (how OpenAI and vLLM count completion tokens; such a token never shows in `text` either).
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: FinishReason | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    num_generated_tokens: int = 0
    error: LoraplexError | None = None  # why it failed (finish_reason "error"), e.g. its adapter would not load
