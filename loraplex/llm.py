"""LLM: the offline Python API.

    llm = LLM("default", dtype="float32")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=16, temperature=0.0))
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

from loraplex.adapters.storage import ObjectStore
from loraplex.config import DEFAULT_MAX_LORA_RANK, CacheConfig, EngineConfig, LoraConfig, ModelConfig, SchedulerConfig
from loraplex.core import RequestOutput, SamplingParams
from loraplex.engine.engine import LLMEngine

Prompt = str | list[int]


class LLM:
    def __init__(
        self,
        model: str,
        *,
        max_loras: int = 8,
        max_lora_rank: int = DEFAULT_MAX_LORA_RANK,
        dtype: str = "auto",
        device: str = "auto",
        max_model_len: int | None = None,
        kv_cache_memory: int | float | None = None,
        block_size: int = 16,
        max_num_seqs: int = 128,
        max_num_batched_tokens: int = 1024,
        host_cache_bytes: int = 1 << 30,
        disk_cache_bytes: int = 4 << 30,
        adapter_store: str | ObjectStore | None = None,
        cuda_graphs: bool = True,
        prefix_caching: bool = True,
    ):
        """adapter_store: the object store (or its URL) that `register_lora` sources point into.
        cuda_graphs: decode steps replay CUDA graphs where the device and attention backend allow.
        prefix_caching: a prompt prefix computed before (same adapter content) is not computed again."""
        self.config = EngineConfig(
            model=ModelConfig(str(model), dtype=dtype, device=device, max_model_len=max_model_len, cuda_graphs=cuda_graphs),
            cache=CacheConfig(block_size=block_size, kv_cache_memory=kv_cache_memory, prefix_caching=prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens),
            lora=LoraConfig(
                max_loras=max_loras,
                max_lora_rank=max_lora_rank,
                host_cache_bytes=host_cache_bytes,
                disk_cache_bytes=disk_cache_bytes,
                storage_url=adapter_store if isinstance(adapter_store, str) else None,
            ),
        )
        self.engine = LLMEngine(self.config, None if isinstance(adapter_store, str) else adapter_store)
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
        """Validate and register a PEFT LoRA folder under `name` (raises AdapterError)."""
        self.engine.add_lora(name, path)

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
