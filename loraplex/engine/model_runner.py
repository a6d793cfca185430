"""Runs one scheduled step on the model: builds the flat batch, forwards, samples.

Owns the model, the KV cache tensors and the sampler; makes no policy decisions (the scheduler
chose what runs, the block manager chose where the K/V go).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from loraplex.config import CacheConfig, LoraConfig
from loraplex.engine.scheduler import ScheduledSequence
from loraplex.kvcache.attention import AttentionBatch, PrefillSegment, block_slots, decode_backend
from loraplex.lora.adapter import LoraAdapter
from loraplex.lora.layers import LoraBatch, apply_lora
from loraplex.lora.slots import LoraSlots
from loraplex.models.hf_config import ModelArgs
from loraplex.sampling.sampler import Sampler, SamplingRow


class StepResult(NamedTuple):
    sampled: list[ScheduledSequence]  # the entries that sampled a token, in step order
    token_ids: list[int]
    logprobs: list[float | None]


def available_memory(device: torch.device) -> int:
    """Free bytes on the device: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")


def kv_cache_bytes(config: CacheConfig, device: torch.device) -> int:
    budget = config.kv_cache_memory
    if budget is None:
        budget = 0.9 if device.type == "cuda" else 0.25
    if budget <= 1:  # CacheConfig has checked that it is > 0
        return int(available_memory(device) * budget)
    return int(budget)


class ModelRunner:
    def __init__(
        self, model, args: ModelArgs, dtype: torch.dtype, device: torch.device, cache: CacheConfig, lora: LoraConfig
    ):
        self.model = model
        self.args = args
        self.dtype = dtype
        self.device = device
        self.block_size = cache.block_size
        self.sampler = Sampler()
        self.lora_slots = LoraSlots(args, lora.max_loras, lora.max_lora_rank, dtype, device)
        self.lora_runtime = apply_lora(model, self.lora_slots, device.type)
        self._copy_stream = None  # CUDA side stream for slot copies, made on first use
        per_block = 2 * args.num_layers * cache.block_size * args.num_kv_heads * args.head_dim * dtype.itemsize
        self.num_blocks = kv_cache_bytes(cache, device) // per_block
        shape = (self.num_blocks, cache.block_size, args.num_kv_heads, args.head_dim)
        for layer in model.attention_layers():
            # empty, not zeros: attention reads only slots written this request (pages stay untouched)
            layer.kv_cache = (torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
        self.decode_backend = decode_backend(dtype, device)

    def load_lora(self, slot: int, adapter: LoraAdapter) -> None:
        """Copy an adapter into a slot no running sequence uses. Called on the engine's copy
        thread, concurrently with `execute`; on CUDA the copy runs on a side stream and is
        complete when this returns."""
        if self.device.type != "cuda":
            self.lora_slots.load(slot, adapter)
            return
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            self.lora_slots.load(slot, adapter)
        self._copy_stream.synchronize()

    def execute(self, scheduled: list[ScheduledSequence]) -> StepResult:
        """Decode rows (one new token) go first, then prefill chunks, as AttentionBatch expects;
        within each group, sequences are sorted by adapter slot so that LoRA sees segments."""
        by_slot = lambda entry: entry.seq.lora_slot  # noqa: E731
        decodes = sorted((s for s in scheduled if s.num_tokens == 1), key=by_slot)
        prefills = sorted((s for s in scheduled if s.num_tokens > 1), key=by_slot)
        ordered = decodes + prefills
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping = [self._tensor([self._slot(s.seq.block_table, s.seq.num_computed_tokens) for s in decodes])]
        segments: list[PrefillSegment] = []
        sampled: list[ScheduledSequence] = []
        sample_rows: list[int] = []
        for entry in ordered:
            seq, start = entry.seq, entry.seq.num_computed_tokens
            stop = start + entry.num_tokens
            if entry.num_tokens > 1:
                context = block_slots(self._tensor(seq.block_table), torch.arange(stop, device=self.device), self.block_size)
                segments.append(PrefillSegment(len(input_ids), entry.num_tokens, context))
                slot_mapping.append(context[start:])
            input_ids.extend(seq.token_ids(start, stop))
            positions.extend(range(start, stop))
            if entry.samples:
                sampled.append(entry)
                sample_rows.append(len(input_ids) - 1)
        batch = AttentionBatch(
            slot_mapping=torch.cat(slot_mapping), block_size=self.block_size, decode_backend=self.decode_backend,
            prefills=segments,
        )
        if decodes:
            width = max(len(s.seq.block_table) for s in decodes)
            tables = [s.seq.block_table + [0] * (width - len(s.seq.block_table)) for s in decodes]
            batch.num_decode = len(decodes)
            batch.block_tables = self._tensor(tables, torch.int32)
            batch.context_lens = self._tensor([s.seq.num_computed_tokens + 1 for s in decodes], torch.int32)
        self.lora_runtime.batch = self._lora_batch(ordered)
        hidden = self.model(self._tensor(input_ids), self._tensor(positions), batch)
        if not sampled:
            return StepResult([], [], [])
        logits = self.model.compute_logits(hidden[self._tensor(sample_rows)])
        rows = [
            SamplingRow(e.seq.params, e.seq.prompt_token_ids, e.seq.output_token_ids, e.seq.generator)
            for e in sampled
        ]
        out = self.sampler(logits, rows)
        return StepResult(sampled, out.token_ids, out.logprobs)

    def _lora_batch(self, ordered: list[ScheduledSequence]) -> LoraBatch | None:
        """Runs of equal slot → segments; per packed linear, -1 where the slot's adapter skips it."""
        if all(entry.seq.lora_slot < 0 for entry in ordered):
            return None
        starts, slots = [0], []
        for entry in ordered:
            slot = entry.seq.lora_slot
            if slots and slots[-1] == slot:
                starts[-1] += entry.num_tokens
            else:
                slots.append(slot)
                starts.append(starts[-1] + entry.num_tokens)
        seg_slots = {}
        for packed in {p for s in slots if s >= 0 for p in self.lora_slots.targets[s]}:
            per_module = [s if s >= 0 and packed in self.lora_slots.targets[s] else -1 for s in slots]
            seg_slots[packed] = self._tensor(per_module, torch.int32)
        return LoraBatch(self._tensor(starts, torch.int32), seg_slots)

    def _slot(self, block_table: list[int], position: int) -> int:
        return block_table[position // self.block_size] * self.block_size + position % self.block_size

    def _tensor(self, values, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)
