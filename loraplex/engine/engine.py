"""LLMEngine: add requests, step, abort. Single-threaded: the caller owns the loop."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from loraplex import env
from loraplex.config import EngineConfig
from loraplex.core import RequestOutput, SamplingParams
from loraplex.engine.model_runner import ModelRunner
from loraplex.engine.scheduler import Scheduler
from loraplex.engine.sequence import Sequence
from loraplex.kvcache.block_manager import BlockManager
from loraplex.lora.adapter import LoraAdapter, load_adapter
from loraplex.lora.slot_table import SlotTable
from loraplex.models.loader import load_model
from loraplex.tokenizer import IncrementalDetokenizer, Tokenizer


def resolve_model_dir(model: str) -> Path:
    """"default" → the embedded SmolLM2-135M-Instruct, converted once into the data dir."""
    if model == "default":
        from loraplex.models.default_model import ensure_default_model

        return ensure_default_model(env.data_dir())
    return Path(model)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        model_dir = resolve_model_dir(config.model.model)
        model, self.model_args, self.dtype, self.device = load_model(model_dir, config.model.dtype, config.model.device)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        limit = self.model_args.max_position_embeddings
        self.max_model_len = min(config.model.max_model_len or limit, limit)
        self.runner = ModelRunner(model, self.model_args, self.dtype, self.device, config.cache, config.lora)
        self.block_manager = BlockManager(self.runner.num_blocks, config.cache.block_size)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, SlotTable(config.lora.max_loras))
        self.lora_adapters: dict[str, LoraAdapter] = {}  # validated, on host, by name
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(self.model_args.eos_token_ids)
        self._sequences: dict[str, Sequence] = {}
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._arrivals = itertools.count()

    def add_lora(self, name: str, path: str | Path) -> LoraAdapter:
        """Validate a PEFT folder (AdapterError if it cannot be served) and keep it on the host."""
        adapter = load_adapter(path, self.model_args, name=name, max_rank=self.config.lora.max_lora_rank)
        if name in self.lora_adapters:
            self.remove_lora(name)
        self.lora_adapters[name] = adapter
        return adapter

    def remove_lora(self, name: str) -> None:
        if name not in self.lora_adapters:
            raise ValueError(f"no LoRA adapter named '{name}' has been added")
        if any(seq.lora == name for seq in self._sequences.values()):
            raise ValueError(f"LoRA adapter '{name}' is in use by unfinished requests")
        self.scheduler.slot_table.evict(name)
        del self.lora_adapters[name]

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, lora: str | None = None
    ) -> None:
        """Queue a request; raises ValueError for one that can never run (nothing is queued then)."""
        if request_id in self._sequences:
            raise ValueError(f"request id '{request_id}' is already in use")
        if lora is not None and lora not in self.lora_adapters:
            raise ValueError(f"no LoRA adapter named '{lora}' has been added")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_args.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_token_ids)} tokens; the context window is {self.max_model_len}"
            )
        longest = min(len(prompt_token_ids) + params.max_tokens, self.max_model_len)
        if self.block_manager.blocks_for(longest) > self.block_manager.num_blocks:
            raise ValueError(
                f"a sequence of {longest} tokens does not fit in the KV cache "
                f"({self.block_manager.num_blocks} blocks of {self.block_manager.block_size})"
            )
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        seq = Sequence(request_id, list(prompt_token_ids), params, next(self._arrivals), generator, lora)
        self._sequences[request_id] = seq
        self._detokenizers[request_id] = IncrementalDetokenizer(self.tokenizer)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final state, or None if unknown."""
        seq = self._sequences.get(request_id)
        if seq is None:
            return None
        seq.finish_reason = "abort"
        self._finish(seq)
        return seq.to_output()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one forward pass; returns the requests that got a new token (finished ones included)."""
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        for slot, name in plan.lora_loads:
            self.runner.load_lora(slot, self.lora_adapters[name])
        result = self.runner.execute(plan.scheduled)
        for entry in plan.scheduled:
            entry.seq.num_computed_tokens += entry.num_tokens
        outputs = []
        for entry, token_id, logprob in zip(result.sampled, result.token_ids, result.logprobs):
            seq = entry.seq
            seq.output_token_ids.append(token_id)
            if seq.params.logprobs:
                seq.output_logprobs.append(logprob)
            self._update_text_and_finish(seq, token_id)
            outputs.append(seq.to_output())
        return outputs

    def _update_text_and_finish(self, seq: Sequence, token_id: int) -> None:
        detokenizer = self._detokenizers[seq.request_id]
        previous_len = len(seq.text)
        seq.text += detokenizer.add(token_id)
        params = seq.params
        if (token_id in self.eos_token_ids and not params.ignore_eos) or token_id in params.stop_token_ids:
            seq.finish_reason = "stop"
        elif len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            seq.text += detokenizer.flush()
        if params.stop:
            longest = max(len(s) for s in params.stop)
            search_from = max(0, previous_len - longest + 1)
            hits = [i for i in (seq.text.find(s, search_from) for s in params.stop) if i >= 0]
            if hits:
                seq.text = seq.text[: min(hits)]
                seq.finish_reason = "stop"
        if seq.finish_reason is not None:
            self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        del self._sequences[seq.request_id]
        del self._detokenizers[seq.request_id]
