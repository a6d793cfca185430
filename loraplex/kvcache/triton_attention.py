"""Paged-attention decode as Triton kernels: K/V are read where they lie, through the block tables.

Same signature and semantics as the other decode backends of `attention.py` (`decode`), built for
decode on H100-class GPUs, where a step's attention time is the time to read the KV history:

- one program per (sequence, KV head, context split) handles the KV head's whole query group,
  so each K/V row is read from HBM once for all `Hq // Hkv` query heads (GQA);
- a program walks its part of the context in tiles of TILE_N tokens; each token's cache row is
  found through the block table (`block_tables[b, t // block_size]`, row `t % block_size`), so
  the history is never gathered into a copy and any block size works;
- online softmax (running max and sum; exp2 with log2(e) folded into the scale), float32
  accumulation; q·k in the cache dtype on tensor cores (exact products), p·v with v widened
  exactly to float32 (tf32 for half caches, exact fp32 for float32 caches);
- soft-capping (Gemma 2; SOFTCAP > 0): each score becomes tanh(score / SOFTCAP) * SOFTCAP before
  the softmax, tanh computed from exp2 (|x|'s form, so nothing overflows);
- split-K ("flash decoding"): when batch × KV heads would leave most SMs idle, each sequence's
  context is cut into `num_splits` equal parts whose float32 partials (max, sum, unnormalised
  output) a second kernel merges. num_splits is chosen on the host from shapes only (batch, KV
  heads, the block table's width, the SM count), never from context_lens' values: no
  device→host sync, so a decode step can be captured in a CUDA graph.

Kernels call only Triton builtins (tl.full, not the @jit helper tl.zeros; `tl.reduce` with
Triton's own combine functions, which is what the @jit helpers tl.max / tl.sum call; integer
arithmetic, not tl.cdiv): the tests run an interpreted copy of this module, and @jit helpers
inside triton.language stay compiled-only when triton was first imported without
TRITON_INTERPRET=1 (see lora/ops/triton_ops.py). The interpreter recognises these combine
functions and reduces with numpy.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2_E = 1.4426950408889634
MAX_SPLITS = 32  # partials per (sequence, query head) at most
MIN_TOKENS_PER_SPLIT = 256  # a split shorter than this costs more in partials than it saves
SM_OCCUPANCY = 2  # split until about this many programs per SM


@triton.jit
def _max(x, axis):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def _sum(x, axis):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    qk_scale, window, block_size, group, num_heads, head_dim,
    stride_qb, stride_qh, stride_qd,
    stride_kn, stride_ks, stride_kh, stride_kd,
    stride_vn, stride_vs, stride_vh, stride_vd,
    stride_tb, stride_tm,
    stride_ob, stride_oh, stride_od,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    n = tl.load(lens_ptr + b)
    first = tl.where(window > 0, tl.maximum(n - window, 0), 0)
    # this split's tokens: an equal share of [first, n), whole tiles each
    share = (n - first + NUM_SPLITS - 1) // NUM_SPLITS
    per_split = (share + TILE_N - 1) // TILE_N * TILE_N
    start = first + split * per_split
    end = tl.minimum(start + per_split, n)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < group
    mask_d = offs_d < head_dim
    heads = kv_head * group + offs_g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)

    row_max = tl.full((BLOCK_G,), float("-inf"), tl.float32)  # log2 domain
    row_sum = tl.full((BLOCK_G,), 0.0, tl.float32)
    acc = tl.full((BLOCK_G, BLOCK_D), 0.0, tl.float32)
    for t0 in range(start, end, TILE_N):
        offs_t = t0 + tl.arange(0, TILE_N)
        valid = offs_t < end
        block = tl.load(tables_ptr + b * stride_tb + (offs_t // block_size) * stride_tm, mask=valid, other=0)
        block = block.to(tl.int64)
        row = offs_t % block_size
        kv_mask = valid[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + (block * stride_kn + row * stride_ks + kv_head * stride_kh)[:, None]
                    + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if SOFTCAP > 0.0:  # qk_scale is scale / SOFTCAP here: scores = q.k * scale / SOFTCAP
            t = tl.exp2(-2.8853900817779268 * tl.abs(scores))  # 2 log2(e); tanh(|x|) = (1 - t) / (1 + t)
            capped = (1.0 - t) / (1.0 + t)
            scores = tl.where(scores < 0.0, -capped, capped) * (SOFTCAP * 1.4426950408889634)
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, _max(scores, 1))
        rescale = tl.exp2(row_max - new_max)
        p = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * rescale + _sum(p, 1)
        v = tl.load(v_ptr + (block * stride_vn + row * stride_vs + kv_head * stride_vh)[:, None]
                    + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p, v.to(tl.float32), input_precision=PRECISION)
        row_max = new_max

    mask_out = mask_g[:, None] & mask_d[None, :]
    if NUM_SPLITS == 1:
        out = acc / row_sum[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=mask_out)
    else:
        part = (b * num_heads + heads) * NUM_SPLITS + split  # [BLOCK_G]
        tl.store(part_acc_ptr + part[:, None] * head_dim + offs_d[None, :], acc, mask=mask_out)
        tl.store(part_max_ptr + part, row_max, mask=mask_g)
        tl.store(part_sum_ptr + part, row_sum, mask=mask_g)


@triton.jit
def _merge_splits_kernel(
    part_acc_ptr, part_max_ptr, part_sum_ptr, out_ptr,
    num_heads, head_dim, stride_ob, stride_oh, stride_od,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < NUM_SPLITS
    mask_d = offs_d < head_dim
    part = (b * num_heads + head) * NUM_SPLITS + offs_s
    part_max = tl.load(part_max_ptr + part, mask=mask_s, other=float("-inf"))
    part_sum = tl.load(part_sum_ptr + part, mask=mask_s, other=0.0)
    weight = tl.exp2(part_max - _max(part_max, 0))  # 0 for empty splits (max -inf)
    acc = tl.load(part_acc_ptr + part[:, None] * head_dim + offs_d[None, :],
                  mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    out = _sum(acc * weight[:, None], 0) / _sum(part_sum * weight, 0)
    tl.store(out_ptr + b * stride_ob + head * stride_oh + offs_d * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=mask_d)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Context splits per sequence: enough programs to give every SM about SM_OCCUPANCY of them,
    but no split shorter than MIN_TOKENS_PER_SPLIT tokens of `max_context` (an upper bound of
    the longest context), at most MAX_SPLITS, rounded down to a power of two (the split count is
    a compile-time constant: at most log2(MAX_SPLITS) + 1 compiled variants)."""
    wanted = math.ceil(SM_OCCUPANCY * num_sms / max(1, batch * num_kv_heads))
    by_length = math.ceil(max_context / MIN_TOKENS_PER_SPLIT)
    splits = max(1, min(wanted, by_length, MAX_SPLITS))
    return 1 << (splits.bit_length() - 1)


def _tile_tokens(head_dim: int) -> int:
    return 64 if head_dim <= 128 else 32


def _check(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor, out: Tensor) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or out.shape != q.shape or v_cache.shape != k_cache.shape:
        raise ValueError(f"paged_decode wants q/out [B, Hq, D], caches [N, bs, Hkv, D]; got q {tuple(q.shape)}, "
                         f"out {tuple(out.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    (batch, num_heads, head_dim), num_kv_heads = q.shape, k_cache.shape[2]
    if k_cache.shape[3] != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"paged_decode: q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or context_lens.shape != (batch,):
        raise ValueError(f"paged_decode: block_tables {tuple(block_tables.shape)} / context_lens "
                         f"{tuple(context_lens.shape)} do not match batch {batch}")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise TypeError("paged_decode: block_tables and context_lens must be int32")
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        raise TypeError(f"paged_decode: q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype} must share a dtype")


def paged_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
                 scale: float, window: int | None, out: Tensor, softcap: float | None = None, *,
                 num_splits: int | None = None, tile_tokens: int | None = None) -> None:
    """One query token per sequence against its paged history; writes `out`.

    Semantics:
        for b, h in rows × query heads:
            n = context_lens[b]; first = max(0, n - window) if window else 0
            K_b = [k_cache[block_tables[b, t // bs], t % bs, h // group] for t in first..n-1]
            V_b = the same rows of v_cache
            s = q[b, h].float() @ K_b.float().T * scale
            if softcap: s = tanh(s / softcap) * softcap
            out[b, h] = (softmax(s) @ V_b.float()).to(out.dtype)

    Shapes:
        q, out        [B, Hq, D]                 model dtype (float32, bfloat16, float16); any strides
        k_cache       [N, bs, Hkv, D]            same dtype; any strides; v_cache likewise
        block_tables  [B, max_blocks]            int32; entries past a row's last block are never read
        context_lens  [B]                        int32, >= 1 (the new token included), <= max_blocks * bs
        group = Hq // Hkv; only the cache rows of positions first..n-1 are read.

    num_splits: context splits per sequence (None: `choose_num_splits` on CUDA, 1 elsewhere);
    tile_tokens: tokens per tile (a power of two >= 16; None: 64, or 32 for head_dim > 128).
    Never reads a device value on the host (no sync).
    """
    _check(q, k_cache, v_cache, block_tables, context_lens, out)
    (batch, num_heads, head_dim), (block_size, num_kv_heads) = q.shape, k_cache.shape[1:3]
    if batch == 0:
        return
    if num_splits is None:
        max_context = block_tables.shape[1] * block_size
        num_sms = _sm_count(q.device.index or 0) if q.is_cuda else 1
        num_splits = choose_num_splits(batch, num_kv_heads, max_context, num_sms)
    tile = tile_tokens or _tile_tokens(head_dim)
    group = num_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    partials = _partials(batch, num_heads, num_splits, head_dim, q.device)
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, *partials,
        float(scale) / softcap if softcap else float(scale) * LOG2_E,  # with a cap, the kernel applies LOG2_E
        int(window or 0), block_size, group, num_heads, head_dim,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *out.stride(),
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, TILE_N=tile, NUM_SPLITS=num_splits,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", SOFTCAP=float(softcap or 0.0),
    )
    if num_splits > 1:
        _merge_splits_kernel[(batch, num_heads)](
            *partials, out, num_heads, head_dim, *out.stride(),
            NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
        )


def _partials(batch: int, num_heads: int, num_splits: int, head_dim: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """Float32 scratch for split partials: (acc [B, Hq, S, D], max [B, Hq, S], sum [B, Hq, S]);
    one-element placeholders when there is a single split (the kernel writes `out` directly)."""
    if num_splits == 1:
        placeholder = torch.empty(1, dtype=torch.float32, device=device)
        return placeholder, placeholder, placeholder
    acc = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=device)
    row_max = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=device)
    row_sum = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=device)
    return acc, row_max, row_sum


def decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, batch, scale: float, window: int | None, out: Tensor,
           softcap: float | None = None) -> None:
    """The "triton" decode backend of `attention.paged_attention` (an AttentionBatch `batch`)."""
    paged_decode(q, k_cache, v_cache, batch.block_tables, batch.context_lens, scale, window, out, softcap)
