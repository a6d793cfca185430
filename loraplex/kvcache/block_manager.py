"""Paged KV-cache bookkeeping: which fixed-size blocks each sequence holds, and (prefix caching)
which full blocks hold which token prefix, so that a new sequence can reuse them.

Only integers live here; the cache tensors belong to the model runner. Not thread-safe: the
engine step is its only caller.

Prefix caching. A full block is identified by a hash chain: the hash of (the previous block's
hash, the tokens of this block), where the chain starts from the sequence's `cache_salt` (the
engine puts the adapter's content identity and the tenant's salt there, so blocks are never
shared across adapters, nor across a re-upload with other weights). A block enters the index
only once every one of its tokens has been computed (`cache_computed_blocks`, after a step), so
a preempted or aborted sequence never leaves a half-written block behind. Blocks are
reference-counted; a shared block is read-only (a sequence only ever writes past its matched
prefix, and a match always leaves its last token to compute). A cached block whose last holder
finished stays cached, counted as free, until an allocation needs it: then the least recently
released one is evicted.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Protocol


class HoldsBlocks(Protocol):
    num_computed_tokens: int
    block_table: list[int]


class CachesPrefix(HoldsBlocks, Protocol):
    cache_salt: bytes
    block_hashes: list[bytes]  # the chain hashes of its first full blocks, filled on demand

    @property
    def num_tokens(self) -> int: ...

    def token_ids(self, start: int, stop: int) -> list[int]: ...


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        if num_blocks < 1:
            raise ValueError("the KV cache budget holds no block: raise kv_cache_memory")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        # a stack: the most recently freed blocks are reused first, so a server only ever touches
        # its peak working set of the cache (on CPU, pages are committed on first write)
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks
        self._block_of: dict[bytes, int] = {}  # the prefix index: chain hash → block
        self._hash_of: dict[int, bytes] = {}  # its inverse, for the blocks in the index
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, no holder; oldest first
        self.prefix_queried_tokens = 0  # tokens of admitted sequences looked up in the index
        self.prefix_hit_tokens = 0  # of which found cached
        self.prefix_evictions = 0  # cached blocks given to other tokens

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: never used, or cached with no holder."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_of)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: HoldsBlocks, num_new_tokens: int) -> int:
        """Blocks `seq` must gain to hold `num_new_tokens` more tokens after its computed ones."""
        return max(0, self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table))

    def can_allocate(self, seq: HoldsBlocks, num_new_tokens: int, prefix: list[int] = ()) -> bool:
        """Whether `allocate` can follow (after `take_prefix(seq, prefix)` for a new sequence)."""
        if not prefix:
            return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks
        needed = self.blocks_for(len(prefix) * self.block_size + num_new_tokens) - len(prefix)
        idle = sum(1 for block in prefix if self._refs[block] == 0)  # taking them leaves fewer free
        return needed <= self.num_free_blocks - idle

    def allocate(self, seq: HoldsBlocks, num_new_tokens: int) -> None:
        """Allocate (a new sequence) or append to (a growing one) `seq.block_table`: enough free
        blocks for its next `num_new_tokens` tokens."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"allocate: {needed} blocks needed, {self.num_free_blocks} free")
        for _ in range(needed):
            block = self._free.pop() if self._free else self._evict()
            self._refs[block] = 1
            seq.block_table.append(block)

    def free(self, seq: HoldsBlocks) -> None:
        """Release all of `seq`'s blocks; its cached tokens are gone (num_computed_tokens = 0).
        Blocks in the prefix index stay cached while no one else holds them either."""
        for block in reversed(seq.block_table):  # its tail goes first: the least shareable
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        seq.block_table.clear()
        seq.num_computed_tokens = 0

    # -- prefix caching ---------------------------------------------------------------------------

    def match_prefix(self, seq: CachesPrefix) -> list[int]:
        """The cached blocks holding the longest prefix of `seq`'s tokens, leaving at least its
        last token to compute. A query: nothing changes but `seq.block_hashes` (a memo)."""
        if not self.prefix_caching or seq.block_table:
            return []
        full = (seq.num_tokens - 1) // self.block_size
        matched = []
        for block_hash in self._chain(seq, full)[:full]:
            block = self._block_of.get(block_hash)
            if block is None:
                break
            matched.append(block)
        return matched

    def take_prefix(self, seq: CachesPrefix, prefix: list[int]) -> None:
        """Give a new sequence the blocks `match_prefix` found: they count as computed."""
        if not self.prefix_caching:
            return
        for block in prefix:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        seq.block_table.extend(prefix)
        seq.num_computed_tokens = len(prefix) * self.block_size
        self.prefix_queried_tokens += seq.num_tokens
        self.prefix_hit_tokens += seq.num_computed_tokens

    def cache_computed_blocks(self, seq: CachesPrefix, num_new_tokens: int) -> None:
        """Index the blocks that the step which computed `seq`'s last `num_new_tokens` tokens
        filled (call after each step). A prefix already indexed under another block keeps that
        block; this one stays private."""
        if not self.prefix_caching:
            return
        first = (seq.num_computed_tokens - num_new_tokens) // self.block_size
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        hashes = self._chain(seq, full)
        for index in range(first, full):
            block, block_hash = seq.block_table[index], hashes[index]
            if block_hash not in self._block_of and block not in self._hash_of:
                self._block_of[block_hash] = block
                self._hash_of[block] = block_hash

    def clear_prefix_cache(self) -> int:
        """Forget every cached block no sequence holds (they become plain free blocks); returns
        how many. Blocks held by running sequences stay indexed."""
        for block in self._evictable:
            del self._block_of[self._hash_of.pop(block)]
            self._free.append(block)
        count = len(self._evictable)
        self._evictable.clear()
        return count

    def _evict(self) -> int:
        block, _ = self._evictable.popitem(last=False)
        del self._block_of[self._hash_of.pop(block)]
        self.prefix_evictions += 1
        return block

    def _chain(self, seq: CachesPrefix, num_blocks: int) -> list[bytes]:
        """`seq.block_hashes`, extended to at least its first `num_blocks` full blocks (a memo:
        the tokens of a full block never change). Block i's hash covers the salt and every
        token up to the end of block i."""
        hashes, size = seq.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            previous = hashes[-1] if hashes else hashlib.blake2b(seq.cache_salt, digest_size=16).digest()
            tokens = array("q", seq.token_ids(i * size, (i + 1) * size)).tobytes()
            hashes.append(hashlib.blake2b(previous + tokens, digest_size=16).digest())
        return hashes
