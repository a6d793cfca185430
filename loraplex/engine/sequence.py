"""One request's state inside the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

from loraplex.core import FinishReason, RequestOutput, SamplingParams
from loraplex.errors import LoraplexError


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Owned by the engine; the scheduler moves it between queues, the block manager fills its
    `block_table`, the model runner reads it. `num_computed_tokens` counts the tokens whose K/V
    are in the cache; a step computes the next `n` of them and samples once all are computed."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int
    generator: torch.Generator | None = None
    lora: str | None = None  # adapter name; None = base model
    lora_slot: int = -1  # device slot while running with an adapter, else -1
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[dict[int, float]] = field(default_factory=list)
    ends_with_stop_token: bool = False  # finished on an end-of-sequence / stop token id (not counted)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    cache_salt: bytes = b""  # prefix-cache blocks are shared only between sequences of one salt
    block_hashes: list[bytes] = field(default_factory=list)  # the block manager's memo
    text: str = ""
    finish_reason: FinishReason | None = None
    error: LoraplexError | None = None  # why it failed (finish_reason "error")

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def token_ids(self, start: int, stop: int) -> list[int]:
        """The tokens at positions [start, stop) of prompt + output."""
        prompt_len = len(self.prompt_token_ids)
        if stop <= prompt_len:
            return self.prompt_token_ids[start:stop]
        if start >= prompt_len:
            return self.output_token_ids[start - prompt_len : stop - prompt_len]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - prompt_len]

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def to_output(self) -> RequestOutput:
        """While unfinished, the text holds back a possible partial stop string at its end, so
        that streamed text only ever grows."""
        text = self.text
        if not self.finished and self.params.stop:
            text = text[: max(0, len(text) - self.params.longest_stop + 1)]
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            token_ids=list(self.output_token_ids),
            text=text,
            finished=self.finished,
            finish_reason=self.finish_reason,
            logprobs=list(self.output_logprobs) if self.params.logprobs else None,
            top_logprobs=list(self.output_top_logprobs) if self.params.top_logprobs else None,
            num_generated_tokens=len(self.output_token_ids) - self.ends_with_stop_token,
            error=self.error,
        )
