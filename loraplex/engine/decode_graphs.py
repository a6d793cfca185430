"""CUDA graphs for decode steps: one graph per (batch-size bucket, with or without LoRA), replayed
instead of launching every kernel of the forward from Python.

A decode step of n sequences runs in the smallest bucket >= n. Its inputs are copied into the
static buffers the graph was captured on; rows n.. are padding: token 0 at position 0, its K/V
written to a scratch slot no sequence owns (the cache's extra block), attention over that one
slot, no adapter. Only rows :n of the output are read. Graphs are captured lazily, the first
time a bucket is needed, after one eager warm-up run (Triton compiles outside the capture).

Contract: the model's decode forward must be capturable, i.e. launch kernels whose shapes
depend on the bucket only and never wait on the device (Triton attention and SGMV kernels; the
block tables padded to the longest possible sequence). With `capture=False` (CPU tests) every
step runs the same padded forward eagerly on the static buffers: every path but the capture.
Owned by the model runner; used from the engine thread only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from loraplex.kvcache.attention import AttentionBatch
from loraplex.lora.layers import LoraBatch, LoraRuntime

GRAPH_SAFE_DECODE_BACKENDS = frozenset({"triton"})  # decode attention that never syncs with the host


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8, up to and including max_batch."""
    buckets = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return buckets + [max_batch]


class DecodeGraphs:
    def __init__(
        self, forward: Callable[[torch.Tensor, torch.Tensor, AttentionBatch], torch.Tensor], lora: LoraRuntime,
        packed_linears: Sequence[str], *, max_batch: int, max_blocks: int, block_size: int, scratch_block: int,
        decode_backend: str, device: torch.device, capture: bool = True,
    ):
        """forward(input_ids, positions, batch) → hidden [T, H]: the model's forward. scratch_block: a
        KV block outside the block manager's, where padding rows write."""
        self.buckets = batch_buckets(max_batch)
        self._forward, self._lora, self._capture = forward, lora, capture
        self._block_size, self._decode_backend = block_size, decode_backend
        self._scratch_block = scratch_block
        size = self.buckets[-1]
        ints = dict(dtype=torch.int32, device=device)
        self._input_ids = torch.zeros(size, dtype=torch.int64, device=device)
        self._positions = torch.zeros(size, dtype=torch.int64, device=device)
        self._slot_mapping = torch.full((size,), scratch_block * block_size, dtype=torch.int64, device=device)
        self._block_tables = torch.full((size, max_blocks), scratch_block, **ints)
        self._context_lens = torch.ones(size, **ints)
        self._seg_starts = torch.arange(size + 1, **ints)  # one segment per token (a decode row)
        self._seg_slots = {packed: torch.full((size,), -1, **ints) for packed in packed_linears}
        self._graphs: dict[tuple[int, bool], Callable[[], torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None

    def max_batch(self) -> int:
        return self.buckets[-1]

    @property
    def made(self) -> set[tuple[int, bool]]:
        """The (bucket, with LoRA) graphs made so far."""
        return set(self._graphs)

    def run(
        self, input_ids: list[int], positions: list[int], slot_mapping: list[int], block_tables: list[list[int]],
        context_lens: list[int], lora_slots: dict[str, list[int]] | None,
    ) -> torch.Tensor:
        """One decode step of n = len(input_ids) <= max_batch() rows → hidden [n, H] (a view of the
        graph's output: read it before the next run). lora_slots: per packed linear, each row's
        slot or -1 (None: no adapter in this step); the same arguments as an eager step."""
        n = len(input_ids)
        bucket = next(b for b in self.buckets if b >= n)
        self._fill(self._input_ids, input_ids, bucket, 0)
        self._fill(self._positions, positions, bucket, 0)
        self._fill(self._slot_mapping, slot_mapping, bucket, self._scratch_block * self._block_size)
        self._fill(self._context_lens, context_lens, bucket, 1)
        width = max(len(row) for row in block_tables)
        rows = torch.tensor([row + [self._scratch_block] * (width - len(row)) for row in block_tables], dtype=torch.int32)
        self._block_tables[:n, :width].copy_(rows, non_blocking=True)
        self._block_tables[n:bucket, 0] = self._scratch_block
        for packed, slots in self._seg_slots.items():
            self._fill(slots, lora_slots.get(packed, [-1] * n) if lora_slots else [-1] * n, bucket, -1)
        key = (bucket, lora_slots is not None)
        if key not in self._graphs:
            self._graphs[key] = self._make(bucket, lora_slots is not None)
        return self._graphs[key]()[:n]

    @staticmethod
    def _fill(buffer: torch.Tensor, values: list[int], bucket: int, padding: int) -> None:
        n = len(values)
        buffer[:n].copy_(torch.tensor(values, dtype=buffer.dtype), non_blocking=True)
        buffer[n:bucket] = padding

    def _make(self, bucket: int, with_lora: bool) -> Callable[[], torch.Tensor]:
        """The replay function of one bucket: a captured graph, or the eager forward (capture=False)."""
        batch = AttentionBatch(
            slot_mapping=self._slot_mapping[:bucket], block_size=self._block_size, decode_backend=self._decode_backend,
            num_decode=bucket, block_tables=self._block_tables[:bucket], context_lens=self._context_lens[:bucket],
        )
        lora = LoraBatch(self._seg_starts[: bucket + 1], {p: s[:bucket] for p, s in self._seg_slots.items()}) if with_lora else None

        def forward() -> torch.Tensor:
            self._lora.batch = lora
            # a fresh AttentionBatch over the same buffers: it caches per-step values (decode_slots)
            return self._forward(self._input_ids[:bucket], self._positions[:bucket], dataclasses.replace(batch))

        if not self._capture:
            return forward
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            forward()  # warm-up: kernels compiled and tuned before the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the slot-copy thread and the cache's workers keep using CUDA meanwhile
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            hidden = forward()

        def replay() -> torch.Tensor:
            graph.replay()
            return hidden

        return replay
