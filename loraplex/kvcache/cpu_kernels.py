"""CPU paged-attention decode kernel (numba): reads K/V in place through the block tables."""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(parallel=True, fastmath=True, cache=True)
def paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale, window, out, softcap):  # pragma: no cover
    """One query token per sequence against its paged history.

    Semantics:
        for b, h in rows × query heads:
            n = context_lens[b]; first = max(0, n - window) if window else 0
            K_b = [k_cache[block_tables[b, t // bs], t % bs, h // group] for t in first..n-1]
            s = q[b, h] @ K_b.T * scale
            if softcap > 0: s = tanh(s / softcap) * softcap
            out[b, h] = softmax(s) @ V_b
    Shapes: q, out [B, Hq, D] float32; k_cache, v_cache [num_blocks, bs, Hkv, D] float32;
    block_tables [B, max_blocks] int32; context_lens [B] int32; group = Hq // Hkv;
    window: int, 0 = none; softcap: float, 0.0 = none.
    Work is split over (row, kv head) pairs; each K/V row is loaded once for its whole query group.
    """
    num_rows, num_heads, dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    # 1-D row views keep the inner loops unit-stride, which LLVM vectorises
    for work in numba.prange(num_rows * num_kv_heads):
        b = work // num_kv_heads
        kv_head = work % num_kv_heads
        n = context_lens[b]
        first = max(0, n - window) if window > 0 else 0
        length = n - first
        scores = np.empty((group, length), dtype=np.float32)
        for t in range(first, n):
            k_row = k_cache[block_tables[b, t // block_size], t % block_size, kv_head]
            for g in range(group):
                q_row = q[b, kv_head * group + g]
                acc = np.float32(0.0)
                for d in range(dim):
                    acc += q_row[d] * k_row[d]
                score = acc * scale
                if softcap > 0:
                    score = np.float32(math.tanh(score / softcap)) * softcap
                scores[g, t - first] = score
        for g in range(group):
            row = scores[g]
            peak = row.max()
            total = np.float32(0.0)
            for i in range(length):
                e = np.float32(math.exp(row[i] - peak))
                row[i] = e
                total += e
            inv = np.float32(1.0) / total
            for i in range(length):
                row[i] *= inv
        acc = np.zeros((group, dim), dtype=np.float32)
        for t in range(first, n):
            v_row = v_cache[block_tables[b, t // block_size], t % block_size, kv_head]
            for g in range(group):
                p = scores[g, t - first]
                acc_row = acc[g]
                for d in range(dim):
                    acc_row[d] += p * v_row[d]
        for g in range(group):
            out_row = out[b, kv_head * group + g]
            acc_row = acc[g]
            for d in range(dim):
                out_row[d] = acc_row[d]
