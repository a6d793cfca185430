"""Paged KV-cache bookkeeping: which fixed-size blocks each sequence holds.

Only integers live here; the cache tensors belong to the model runner. Not thread-safe: the
engine step is its only caller.
"""

from __future__ import annotations

from typing import Protocol


class HoldsBlocks(Protocol):
    num_computed_tokens: int
    block_table: list[int]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError("the KV cache budget holds no block: raise kv_cache_memory")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # a stack: the most recently freed blocks are reused first, so a server only ever touches
        # its peak working set of the cache (on CPU, pages are committed on first write)
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: HoldsBlocks, num_new_tokens: int) -> int:
        """Blocks `seq` must gain to hold `num_new_tokens` more tokens after its computed ones."""
        return max(0, self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table))

    def can_allocate(self, seq: HoldsBlocks, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self._free)

    def allocate(self, seq: HoldsBlocks, num_new_tokens: int) -> None:
        """Allocate (a new sequence) or append to (a growing one) `seq.block_table`: enough free
        blocks for its next `num_new_tokens` tokens."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > len(self._free):
            raise RuntimeError(f"allocate: {needed} blocks needed, {len(self._free)} free")
        seq.block_table.extend(self._free.pop() for _ in range(needed))

    def free(self, seq: HoldsBlocks) -> None:
        """Return all of `seq`'s blocks; its cached tokens are gone (num_computed_tokens = 0)."""
        self._free.extend(reversed(seq.block_table))
        seq.block_table.clear()
        seq.num_computed_tokens = 0
