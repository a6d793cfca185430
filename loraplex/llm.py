"""LLM: the offline Python API.

    llm = LLM("default", dtype="float32")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=16, temperature=0.0))
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

from loraplex.adapters.cache import LocalSource
from loraplex.adapters.storage import ObjectStore
from loraplex.config import engine_config
from loraplex.core import RequestOutput, SamplingParams
from loraplex.engine.engine import LLMEngine

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str, *, storage: str | ObjectStore | None = None, **settings):
        """model: a Hugging Face folder, or "default" (the embedded SmolLM2-135M-Instruct).
        storage: the object store (or its URL) that `engine.register_lora` sources point into.
        settings: any engine setting by name (`loraplex.config.engine_settings()`: dtype, device,
        max_loras, max_lora_rank, kv_cache_memory, prefix_caching, cuda_graphs, …), defaults from
        loraplex/config.py."""
        if isinstance(storage, str):
            settings["storage"] = storage
        self.config = engine_config(str(model), **settings)
        self.engine = LLMEngine(self.config, None if isinstance(storage, str) else storage)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora: str | None | Sequence[str | None] = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion, batched together; outputs come back in prompt order.

        A str prompt is encoded with the tokenizer's own special-token rules; a list[int] is used
        as is. `params` is one SamplingParams for all, or one per prompt; `lora` is one adapter
        name (or None, the base model) for all, or one per prompt.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        token_lists = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        return self._run(token_lists, params, lora)

    def chat(
        self,
        conversations: Sequence[list[dict]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora: str | None | Sequence[str | None] = None,
    ) -> list[RequestOutput]:
        """Each conversation is a list of {"role", "content"} messages, rendered by the chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self._run([self.tokenizer.encode_chat(c) for c in conversations], params, lora)

    def add_lora(self, name: str, path: str | Path) -> None:
        """Validate and register a PEFT LoRA folder under `name` (raises AdapterInvalid)."""
        self.engine.register_lora(name, LocalSource(Path(path)), load_now=True)

    def remove_lora(self, name: str) -> None:
        self.engine.remove_lora(name)

    def _run(self, token_lists, params, lora) -> list[RequestOutput]:
        params_list = _per_prompt(params if params is not None else SamplingParams(), len(token_lists), SamplingParams)
        loras = _per_prompt(lora, len(token_lists), str)
        request_ids = [f"offline-{next(self._ids)}" for _ in token_lists]
        try:
            for request_id, tokens, p, name in zip(request_ids, token_lists, params_list, loras):
                self.engine.add_request(request_id, tokens, p, name)
            finals: dict[str, RequestOutput] = {}
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        finals[out.request_id] = out
        finally:
            for request_id in request_ids:
                self.engine.abort(request_id)
        return [finals[request_id] for request_id in request_ids]


def _per_prompt(value, count: int, single_type: type) -> list:
    if value is None or isinstance(value, single_type):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise ValueError(f"expected one value per prompt ({count}), got {len(values)}")
    return values
