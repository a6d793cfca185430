"""Runs one scheduled step on the model: builds the flat batch, forwards, samples.

Owns the model, the KV cache tensors and the sampler; makes no policy decisions (the scheduler
chose what runs, the block manager chose where the K/V go).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from loraplex.config import CacheConfig, LoraConfig
from loraplex.engine.decode_graphs import GRAPH_SAFE_DECODE_BACKENDS, DecodeGraphs
from loraplex.engine.scheduler import ScheduledSequence
from loraplex.kvcache.attention import AttentionBatch, PrefillSegment, block_slots, decode_backend
from loraplex.lora.adapter import LoraAdapter
from loraplex.lora.layers import LoraBatch, apply_lora
from loraplex.lora.slots import PACKED_TARGETS, LoraSlots
from loraplex.models.hf_config import ModelArgs
from loraplex.sampling.sampler import Sampler, SamplingRow


class StepResult(NamedTuple):
    sampled: list[ScheduledSequence]  # the entries that sampled a token, in step order
    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[dict[int, float] | None] | None = None  # None: no row asked for them


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
        # the blocks the block manager hands out, plus one scratch block (outside the budget)
        # where the padding rows of decode graphs write
        self.num_blocks = kv_cache_bytes(cache, device) // per_block
        shape = (self.num_blocks + 1, cache.block_size, args.num_kv_heads, args.head_dim)
        for layer in model.attention_layers():
            # empty, not zeros: attention reads only slots written this request (pages stay untouched)
            layer.kv_cache = (torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
        self.decode_backend = decode_backend(dtype, device)
        self.decode_graphs: DecodeGraphs | None = None

    def enable_decode_graphs(self, max_batch: int, max_model_len: int, capture: bool = True) -> None:
        """Run decode-only steps of up to `max_batch` sequences through DecodeGraphs (CUDA graphs;
        `capture=False`: the same static-buffer path, eager, for tests on any device)."""
        if capture and (self.device.type != "cuda" or self.decode_backend not in GRAPH_SAFE_DECODE_BACKENDS):
            raise ValueError(f"CUDA graphs need a CUDA device and a graph-safe decode attention "
                             f"({sorted(GRAPH_SAFE_DECODE_BACKENDS)}), not {self.device.type} / {self.decode_backend!r}")
        self.decode_graphs = DecodeGraphs(
            self.model, self.lora_runtime, list(PACKED_TARGETS), max_batch=max_batch,
            max_blocks=-(-max_model_len // self.block_size), block_size=self.block_size,
            scratch_block=self.num_blocks, decode_backend=self.decode_backend, device=self.device, capture=capture,
        )

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
        within each group, sequences are sorted by adapter slot so that LoRA sees segments.
        A decode-only step runs through the decode graphs when they are enabled and it fits."""
        by_slot = lambda entry: entry.seq.lora_slot  # noqa: E731
        decodes = sorted((s for s in scheduled if s.num_tokens == 1), key=by_slot)
        prefills = sorted((s for s in scheduled if s.num_tokens > 1), key=by_slot)
        ordered = decodes + prefills
        graphs = self.decode_graphs
        if graphs is not None and decodes and not prefills and len(decodes) <= graphs.max_batch():
            hidden = self._decode_with_graphs(decodes)
        else:
            hidden = self._forward(decodes, prefills)
        sampled, sample_rows, end = [], [], 0
        for entry in ordered:
            end += entry.num_tokens
            if entry.samples:
                sampled.append(entry)
                sample_rows.append(end - 1)  # its last token's row
        if not sampled:
            return StepResult([], [], [])
        logits = self.model.compute_logits(hidden[self._tensor(sample_rows)])
        rows = [
            SamplingRow(e.seq.params, e.seq.prompt_token_ids, e.seq.output_token_ids, e.seq.generator)
            for e in sampled
        ]
        out = self.sampler(logits, rows)
        return StepResult(sampled, out.token_ids, out.logprobs, out.top_logprobs)

    def _forward(self, decodes: list[ScheduledSequence], prefills: list[ScheduledSequence]) -> torch.Tensor:
        """The eager forward of one step → hidden [T, H], rows in decodes + prefills order."""
        ordered = decodes + prefills
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping = [self._tensor([self._slot(s.seq.block_table, s.seq.num_computed_tokens) for s in decodes])]
        segments: list[PrefillSegment] = []
        for entry in ordered:
            seq, start = entry.seq, entry.seq.num_computed_tokens
            stop = start + entry.num_tokens
            if entry.num_tokens > 1:
                context = block_slots(self._tensor(seq.block_table), torch.arange(stop, device=self.device), self.block_size)
                segments.append(PrefillSegment(len(input_ids), entry.num_tokens, context))
                slot_mapping.append(context[start:])
            input_ids.extend(seq.token_ids(start, stop))
            positions.extend(range(start, stop))
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
        return self.model(self._tensor(input_ids), self._tensor(positions), batch)

    def _decode_with_graphs(self, decodes: list[ScheduledSequence]) -> torch.Tensor:
        seqs = [entry.seq for entry in decodes]
        slots = [seq.lora_slot for seq in seqs]
        return self.decode_graphs.run(
            input_ids=[seq.token_ids(seq.num_computed_tokens, seq.num_computed_tokens + 1)[0] for seq in seqs],
            positions=[seq.num_computed_tokens for seq in seqs],
            slot_mapping=[self._slot(seq.block_table, seq.num_computed_tokens) for seq in seqs],
            block_tables=[seq.block_table for seq in seqs],
            context_lens=[seq.num_computed_tokens + 1 for seq in seqs],
            lora_slots=self._per_packed(slots) if any(slot >= 0 for slot in slots) else None,
        )

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
        seg_slots = {packed: self._tensor(per_slot, torch.int32) for packed, per_slot in self._per_packed(slots).items()}
        return LoraBatch(self._tensor(starts, torch.int32), seg_slots)

    def _per_packed(self, slots: list[int]) -> dict[str, list[int]]:
        """For each packed linear that an adapter in `slots` touches: `slots`, with -1 where the
        slot's adapter leaves that linear alone."""
        targets = self.lora_slots.targets
        used = {packed for slot in slots if slot >= 0 for packed in targets[slot]}
        return {packed: [slot if slot >= 0 and packed in targets[slot] else -1 for slot in slots] for packed in used}

    def _slot(self, block_table: list[int], position: int) -> int:
        return block_table[position // self.block_size] * self.block_size + position % self.block_size

    def _tensor(self, values, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)
