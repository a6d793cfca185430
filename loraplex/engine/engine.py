"""LLMEngine: add requests, step, abort. Single-threaded: the caller owns the loop (the adapter
residency's worker threads load adapters meanwhile)."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import NamedTuple

import torch

from loraplex import env, errors
from loraplex.adapters.residency import AdapterResidency, Source
from loraplex.adapters.storage import ObjectStore, open_store
from loraplex.config import EngineConfig
from loraplex.core import RequestOutput, SamplingParams
from loraplex.engine.decode_graphs import GRAPH_SAFE_DECODE_BACKENDS
from loraplex.engine.model_runner import ModelRunner
from loraplex.engine.scheduler import Scheduler
from loraplex.engine.sequence import Sequence
from loraplex.kvcache.block_manager import BlockManager
from loraplex.lora.adapter import LoraAdapter
from loraplex.models.loader import load_model
from loraplex.tokenizer import IncrementalDetokenizer, Tokenizer

class EngineStats(NamedTuple):
    """A snapshot of the engine's queues and resources (for metrics)."""

    waiting: int
    running: int
    kv_blocks_total: int
    kv_blocks_free: int
    lora_slots_total: int
    lora_slots_occupied: int
    slot_loads: int  # host → slot copies finished so far
    slot_load_seconds: float  # their total duration
    preemptions: int = 0  # sequences preempted so far for want of KV blocks (recomputed later)
    prefix_queried_tokens: int = 0  # prompt tokens of admitted requests looked up in the prefix cache
    prefix_hit_tokens: int = 0  # of which found cached (not computed again)
    prefix_evictions: int = 0  # cached KV blocks reused for other tokens


def resolve_model_dir(model: str, data_dir: Path) -> Path:
    """"default" → the embedded SmolLM2-135M-Instruct, converted once into the data dir."""
    if model == "default":
        from loraplex.models.default_model import ensure_default_model

        return ensure_default_model(data_dir)
    return Path(model)


MAX_GRAPH_BATCH = 256  # decode steps of more sequences run eagerly (their launch cost is amortised anyway)


class LLMEngine:
    def __init__(self, config: EngineConfig, adapter_store: ObjectStore | None = None):
        """adapter_store: where remote adapters live; default: opened from lora.storage."""
        self.config = config
        data_dir = Path(config.data_dir) if config.data_dir else env.data_dir()
        model_dir = resolve_model_dir(config.model.model, data_dir)
        model, self.model_args, self.dtype, self.device = load_model(model_dir, config.model.dtype, config.model.device)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        limit = self.model_args.max_position_embeddings
        self.max_model_len = min(config.model.max_model_len or limit, limit)
        self.runner = ModelRunner(model, self.model_args, self.dtype, self.device, config.cache, config.lora)
        self.block_manager = BlockManager(self.runner.num_blocks, config.cache.block_size, config.cache.prefix_caching)
        if config.model.cuda_graphs and self.device.type == "cuda" and self.runner.decode_backend in GRAPH_SAFE_DECODE_BACKENDS:
            self.runner.enable_decode_graphs(min(config.scheduler.max_num_seqs, MAX_GRAPH_BATCH), self.max_model_len)
        self._wakeup = threading.Event()  # set when an adapter load or slot copy finished or failed
        self.adapters = AdapterResidency(
            self.model_args, config.lora, data_dir=data_dir,
            store=adapter_store or (open_store(config.lora.storage) if config.lora.storage else None),
            load_slot=self.runner.load_lora, bytes_per_slot=self.runner.lora_slots.bytes_per_slot,
            pin_memory=self.device.type == "cuda", on_change=self._wakeup.set)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.adapters)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(self.model_args.eos_token_ids)
        self._sequences: dict[str, Sequence] = {}
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._arrivals = itertools.count()

    def close(self) -> None:
        """Stop the adapter workers and remove this engine's download folder (idempotent; also
        done when the engine is collected). The engine cannot load adapters afterwards."""
        self.adapters.close()

    def register_lora(self, name: str, source: Source, load_now: bool = False) -> LoraAdapter | None:
        """Make an adapter known under `name` (see AdapterResidency.register): requests for it
        wait, without blocking others, until it is in a slot."""
        return self.adapters.register(name, source, load_now)

    def remove_lora(self, name: str) -> None:
        """Forget adapter `name` in every tier; refused while unfinished requests use it."""
        if self.lora_in_use(name):
            raise errors.InvalidInput(f"LoRA adapter '{name}' is in use by unfinished requests")
        self.adapters.remove(name)

    def lora_in_use(self, name: str) -> bool:
        """Whether unfinished requests use adapter `name`."""
        return any(seq.lora == name for seq in self._sequences.values())

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, lora: str | None = None,
        cache_salt: str = "",
    ) -> None:
        """Queue a request; raises ValueError for one that can never run (nothing is queued then).
        cache_salt: its cached prompt prefix is shared only with requests of the same salt (and
        adapter content); the API gives each account its own."""
        if request_id in self._sequences:
            raise ValueError(f"request id '{request_id}' is already in use")
        if lora is not None and lora not in self.adapters.names:
            raise errors.InvalidInput(f"no LoRA adapter named '{lora}' has been added")
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
        seq.cache_salt = f"{self.adapters.identity(lora)}\0{cache_salt}".encode()
        self._sequences[request_id] = seq
        self._detokenizers[request_id] = IncrementalDetokenizer(self.tokenizer)
        if lora is not None:
            self.adapters.pin(lora)  # kept in host memory until this request is done
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
        """Run one forward pass; returns the requests that got a new token or failed (finished
        ones included). With nothing runnable (all waiting on adapter loads) it waits briefly for
        a load to finish instead of spinning."""
        failed = self._fail_requests_of_failed_adapters()
        plan = self.scheduler.schedule()
        if plan.is_empty:
            if not failed:
                self._wakeup.wait(0.05)
            self._wakeup.clear()
            return failed
        result = self.runner.execute(plan.scheduled)
        for entry in plan.scheduled:
            entry.seq.num_computed_tokens += entry.num_tokens
            self.block_manager.cache_computed_blocks(entry.seq, entry.num_tokens)
        outputs = failed
        top_logprobs = result.top_logprobs or [None] * len(result.sampled)
        for entry, token_id, logprob, top in zip(result.sampled, result.token_ids, result.logprobs, top_logprobs):
            seq = entry.seq
            seq.output_token_ids.append(token_id)
            if seq.params.logprobs:
                seq.output_logprobs.append(logprob)
            if seq.params.top_logprobs:
                seq.output_top_logprobs.append(top)
            self._update_text_and_finish(seq, token_id)
            outputs.append(seq.to_output())
        return outputs

    def stats(self) -> EngineStats:
        """Engine-thread only (reads the scheduler's queues)."""
        slots = self.adapters.slots
        return EngineStats(
            waiting=len(self.scheduler.waiting),
            running=len(self.scheduler.running),
            kv_blocks_total=self.block_manager.num_blocks,
            kv_blocks_free=self.block_manager.num_free_blocks,
            lora_slots_total=slots.num_slots,
            lora_slots_occupied=slots.num_occupied,
            slot_loads=self.adapters.slot_loads,
            slot_load_seconds=self.adapters.slot_load_seconds,
            preemptions=self.scheduler.num_preemptions,
            prefix_queried_tokens=self.block_manager.prefix_queried_tokens,
            prefix_hit_tokens=self.block_manager.prefix_hit_tokens,
            prefix_evictions=self.block_manager.prefix_evictions,
        )

    def _update_text_and_finish(self, seq: Sequence, token_id: int) -> None:
        detokenizer = self._detokenizers[seq.request_id]
        previous_len = len(seq.text)
        seq.text += detokenizer.add(token_id)
        params = seq.params
        if (token_id in self.eos_token_ids and not params.ignore_eos) or token_id in params.stop_token_ids:
            seq.finish_reason = "stop"
            seq.ends_with_stop_token = True
        elif len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            seq.text += detokenizer.flush()
        if params.stop:  # only the tail that the new text can complete a stop string in
            search_from = max(0, previous_len - params.longest_stop + 1)
            hits = [i for i in (seq.text.find(s, search_from) for s in params.stop) if i >= 0]
            if hits:
                seq.text = seq.text[: min(hits)]
                seq.finish_reason = "stop"
        if seq.finish_reason is not None:
            self._finish(seq)

    def _fail_requests_of_failed_adapters(self) -> list[RequestOutput]:
        """Waiting requests whose adapter failed to load (into host memory, or into a slot) end
        now, with the reason; everyone else goes on."""
        waiting = [seq for seq in self.scheduler.waiting if seq.lora is not None]
        failures = self.adapters.step(seq.lora for seq in waiting)
        failed = []
        for seq in waiting:
            if seq.lora in failures:
                seq.finish_reason, seq.error = "error", failures[seq.lora]
                self._finish(seq)
                failed.append(seq.to_output())
        return failed

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        if seq.lora is not None:
            self.adapters.unpin(seq.lora)
        del self._sequences[seq.request_id]
        del self._detokenizers[seq.request_id]
