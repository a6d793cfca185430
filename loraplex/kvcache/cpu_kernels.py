"""CPU paged-attention decode kernel (numba): reads K/V in place through the block tables."""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(parallel=True, fastmath=True, cache=True)
def paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale, window, out):  # pragma: no cover - jitted
    """One query token per sequence against its paged history.

    Semantics:
        for b, h in rows × query heads:
            n = context_lens[b]; first = max(0, n - window) if window else 0
            K_b = [k_cache[block_tables[b, t // bs], t % bs, h // group] for t in first..n-1]
            out[b, h] = softmax(q[b, h] @ K_b.T * scale) @ V_b
    Shapes: q, out [B, Hq, D] float32; k_cache, v_cache [num_blocks, bs, Hkv, D] float32;
    block_tables [B, max_blocks] int32; context_lens [B] int32; group = Hq // Hkv.
    Work is split over (row, kv head) pairs; each K/V row is loaded once for its whole query group.
    """
    num_rows, num_heads, dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    for work in numba.prange(num_rows * num_kv_heads):
        b = work // num_kv_heads
        kv_head = work % num_kv_heads
        n = context_lens[b]
        first = max(0, n - window) if window > 0 else 0
        length = n - first
        scores = np.empty((group, length), dtype=np.float32)
        for t in range(first, n):
            block = block_tables[b, t // block_size]
            offset = t % block_size
            for g in range(group):
                acc = np.float32(0.0)
                for d in range(dim):
                    acc += q[b, kv_head * group + g, d] * k_cache[block, offset, kv_head, d]
                scores[g, t - first] = acc * scale
        for g in range(group):
            peak = scores[g].max()
            total = np.float32(0.0)
            for i in range(length):
                e = math.exp(scores[g, i] - peak)
                scores[g, i] = e
                total += e
            scores[g] /= total
        acc_out = np.zeros((group, dim), dtype=np.float32)
        for t in range(first, n):
            block = block_tables[b, t // block_size]
            offset = t % block_size
            for g in range(group):
                p = scores[g, t - first]
                for d in range(dim):
                    acc_out[g, d] += p * v_cache[block, offset, kv_head, d]
        for g in range(group):
            for d in range(dim):
                out[b, kv_head * group + g, d] = acc_out[g, d]
