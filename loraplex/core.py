"""Shared nouns: what a request asks for and what comes back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass
class SamplingParams:
    """How one request is decoded.

    `temperature == 0` is greedy. `top_k <= 0` and `top_p == 1` disable those filters.
    `repetition_penalty` (HF/CTRL style, >1 discourages) applies to prompt and output tokens;
    `frequency_penalty` and `presence_penalty` (OpenAI style) apply to output tokens only.
    `logprobs=True` returns, per sampled token, the log-softmax of the raw logits at that token.
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

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k is None:
            self.top_k = 0
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be an integer >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (isinstance(self.top_k, int), "top_k must be an integer"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (self.seed is None or isinstance(self.seed, int), "seed must be an integer"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class AdapterRef:
    """Names one LoRA adapter: a stable id and where its PEFT folder lives."""

    name: str
    path: str


@dataclass
class RequestOutput:
    """The result of one request (or its state so far, while streaming).

    `text` is the detokenized `token_ids`, with a matched stop string cut off.
    `logprobs[i]` belongs to `token_ids[i]`; None unless the request asked for logprobs.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: FinishReason | None = None
    logprobs: list[float] | None = None
    error: str | None = None  # why a request failed (finish_reason "error"), e.g. its adapter would not load
    error_code: int | None = None  # the Workers AI error code for `error`
