"""SGMV ops as Triton kernels; same signatures and semantics as `torch_ops`.

Grid: (segment, output tile, token lane). A program reads its segment's slot and exits at once
for slot -1; otherwise it walks the segment's tokens in BLOCK_M blocks (lane l takes blocks
l, l + lanes, …), so no host-side max-segment-length (and no device sync) is needed.
Products accumulate in float32. Every tensor is addressed through its strides.

Shrink splits its reduction over IN into chunks of SPLIT_K_CHUNK (one more grid axis): each
split writes a float32 partial, and a second kernel adds the partials in split order. Without it
one program walked all of IN in sequence, a chain of dependent loads that the H200 run of
`benchmarks/gpu_check.sh` showed dominating decode (see benchmarks/RESULTS.md). The number of
splits depends on IN alone, so a token's result does not depend on its batch.

Kernels call only Triton builtins (tl.full, not the @jit helper tl.zeros): the tests run an
interpreted copy of this module, and @jit helpers inside triton.language stay compiled-only
when triton was first imported without TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .torch_ops import check_expand, check_shrink, shrink_then_expand

BLOCK_M = 16  # tokens per tile (tl.dot wants every tile dim >= 16)
MAX_LANES = 64  # token lanes per segment on the grid
SPLIT_K_CHUNK = 512  # IN elements per shrink program (a multiple of every BLOCK_K)


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, starts_ptr, slots_ptr, part_ptr,
    R, IN, R_TILES,
    stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_ps, stride_pt, stride_pr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, K_CHUNK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """part[split, t, r] = x[t, chunk] @ A[slot][r, chunk] over IN chunk `split` (axis 1 of the
    grid is r_tile + R_TILES * split)."""
    g = tl.program_id(0)
    slot = tl.load(slots_ptr + g)
    if slot < 0:
        return
    start = tl.load(starts_ptr + g)
    end = tl.load(starts_ptr + g + 1)
    split = tl.program_id(1) // R_TILES
    offs_r = (tl.program_id(1) % R_TILES) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    a_base = a_ptr + slot.to(tl.int64) * stride_as
    k_start = split * K_CHUNK
    k_end = tl.minimum(k_start + K_CHUNK, IN)
    part_base = part_ptr + split.to(tl.int64) * stride_ps
    for m0 in range(start + tl.program_id(2) * BLOCK_M, end, tl.num_programs(2) * BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = offs_m < end
        acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            k = k0 + offs_k
            x = tl.load(x_ptr + offs_m[:, None] * stride_xt + k[None, :] * stride_xk,
                        mask=mask_m[:, None] & (k[None, :] < k_end), other=0.0)
            a_t = tl.load(a_base + k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                          mask=(k[:, None] < k_end) & (offs_r[None, :] < R), other=0.0)
            acc = tl.dot(x, a_t, acc, input_precision=PRECISION)
        tl.store(part_base + offs_m[:, None] * stride_pt + offs_r[None, :] * stride_pr, acc,
                 mask=mask_m[:, None] & (offs_r[None, :] < R))


@triton.jit
def _sum_splits_kernel(
    part_ptr, starts_ptr, slots_ptr, out_ptr,
    R, SPLITS,
    stride_ps, stride_pt, stride_pr, stride_ot, stride_or,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[t, r] = sum over split (in order) of part[split, t, r], for tokens of segments with an
    adapter; the grid is (segment, r tile, token lane) as in the shrink."""
    g = tl.program_id(0)
    slot = tl.load(slots_ptr + g)
    if slot < 0:
        return
    start = tl.load(starts_ptr + g)
    end = tl.load(starts_ptr + g + 1)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    for m0 in range(start + tl.program_id(2) * BLOCK_M, end, tl.num_programs(2) * BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (offs_m < end)[:, None] & (offs_r[None, :] < R)
        acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
        for split in range(0, SPLITS):
            acc += tl.load(part_ptr + split * stride_ps + offs_m[:, None] * stride_pt + offs_r[None, :] * stride_pr,
                           mask=mask, other=0.0)
        tl.store(out_ptr + offs_m[:, None] * stride_ot + offs_r[None, :] * stride_or, acc, mask=mask)


@triton.jit
def _expand_kernel(
    h_ptr, b_ptr, starts_ptr, slots_ptr, y_ptr,
    R, N,
    stride_ht, stride_hr, stride_bs, stride_bn, stride_br, stride_yt, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    g = tl.program_id(0)
    slot = tl.load(slots_ptr + g)
    if slot < 0:
        return
    start = tl.load(starts_ptr + g)
    end = tl.load(starts_ptr + g + 1)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    b_base = b_ptr + slot.to(tl.int64) * stride_bs
    for m0 in range(start + tl.program_id(2) * BLOCK_M, end, tl.num_programs(2) * BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = offs_m < end
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + offs_r
            h = tl.load(h_ptr + offs_m[:, None] * stride_ht + r[None, :] * stride_hr,
                        mask=mask_m[:, None] & (r[None, :] < R), other=0.0)
            b_t = tl.load(b_base + r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                          mask=(r[:, None] < R) & (offs_n[None, :] < N), other=0.0)
            acc = tl.dot(h, b_t.to(tl.float32), acc, input_precision=PRECISION)
        y_ptrs = y_ptr + offs_m[:, None] * stride_yt + offs_n[None, :] * stride_yn
        mask = mask_m[:, None] & (offs_n[None, :] < N)
        y = tl.load(y_ptrs, mask=mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def _lanes(num_tokens: int, num_segments: int) -> int:
    """Token lanes per segment: about the average segment's number of BLOCK_M blocks."""
    return max(1, min(MAX_LANES, triton.cdiv(triton.cdiv(num_tokens, num_segments), BLOCK_M)))


def sgmv_shrink(x: Tensor, lora_a: Tensor, seg_starts: Tensor, seg_slots: Tensor, out: Tensor) -> None:
    """Project each segment's tokens down onto its adapter's A: out = x @ A[slot].T.

    Semantics:
        for g in range(G):
            s, e, w = seg_starts[g], seg_starts[g + 1], seg_slots[g]
            if w >= 0:
                out[s:e] = x[s:e].float() @ lora_a[w].float().T
        # rows of segments with w == -1 are left untouched

    Shapes:
        x          [T, IN]    model dtype
        lora_a     [S, R, IN] same dtype as x; R = rank capacity (any R, masked to pow2 tiles)
        seg_starts [G + 1]    int32, on x.device
        seg_slots  [G]        int32, on x.device; -1 = no adapter
        out        [T, R]     float32, written in place
    float32 inputs use exact ("ieee") fp32 dots; half inputs use tensor cores, fp32 accumulation.
    """
    check_shrink(x, lora_a, out)
    if x.dtype != lora_a.dtype:
        raise TypeError(f"sgmv_shrink: x {x.dtype} and lora_a {lora_a.dtype} must share a dtype")
    (t, in_features), r, g = x.shape, lora_a.shape[1], seg_slots.numel()
    if t == 0 or g == 0 or r == 0:
        return
    block_r, block_k = _block(r, 16, 64), _block(in_features, 16, 64)
    r_tiles, splits, lanes = triton.cdiv(r, block_r), triton.cdiv(in_features, SPLIT_K_CHUNK), _lanes(t, g)
    # one split writes `out` directly; several write partials that _sum_splits_kernel adds up
    part = out.unsqueeze(0) if splits == 1 else torch.empty(splits, t, r, dtype=torch.float32, device=x.device)
    _shrink_kernel[(g, r_tiles * splits, lanes)](
        x, lora_a, seg_starts, seg_slots, part, r, in_features, r_tiles,
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        part.stride(0), part.stride(1), part.stride(2),
        BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_K=block_k, K_CHUNK=SPLIT_K_CHUNK,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
    )
    if splits > 1:
        _sum_splits_kernel[(g, r_tiles, lanes)](
            part, seg_starts, seg_slots, out, r, splits,
            part.stride(0), part.stride(1), part.stride(2), out.stride(0), out.stride(1),
            BLOCK_M=BLOCK_M, BLOCK_R=block_r,
        )


def sgmv_expand(h: Tensor, lora_b: Tensor, seg_starts: Tensor, seg_slots: Tensor, y: Tensor, offset: int) -> None:
    """Project each segment's low-rank activations up through its adapter's B, adding into y.

    Semantics:
        for g in range(G):
            s, e, w = seg_starts[g], seg_starts[g + 1], seg_slots[g]
            if w >= 0:
                y[s:e, offset:offset + N] = (y[s:e, offset:offset + N].float()
                                             + h[s:e] @ lora_b[w].float().T).to(y.dtype)
        # rows of w == -1 segments and columns outside [offset, offset + N) stay untouched

    Shapes:
        h          [T, R]     float32; may be strided (a column slice of a wider tensor)
        lora_b     [S, N, R]  model dtype
        seg_starts [G + 1]    int32, on h.device
        seg_slots  [G]        int32, on h.device; -1 = no adapter
        y          [T, OUT]   model dtype, OUT >= offset + N, updated in place (read-add-write;
                              segments never overlap, so no atomics)
        offset     int        first output column of this slice
    float32 B uses exact fp32 dots; half B is widened exactly and multiplied in tf32.
    """
    check_expand(h, lora_b, y, offset)
    t, n, r, g = h.shape[0], lora_b.shape[1], lora_b.shape[2], seg_slots.numel()
    if t == 0 or g == 0 or r == 0 or n == 0:
        return
    block_r, block_n = _block(r, 16, 64), _block(n, 16, 128)
    grid = (g, triton.cdiv(n, block_n), _lanes(t, g))
    _expand_kernel[grid](
        h, lora_b, seg_starts, seg_slots, y[:, offset:], r, n,
        h.stride(0), h.stride(1), lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        y.stride(0), y.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_R=block_r,
        PRECISION="ieee" if lora_b.dtype == torch.float32 else "tf32",
    )


def sgmv_lora(x, lora_a, lora_b, offsets, seg_starts, seg_slots, y) -> None:
    """See `torch_ops.sgmv_lora`: this backend's shrink, then its expand per slice."""
    shrink_then_expand(sgmv_shrink, sgmv_expand, x, lora_a, lora_b, offsets, seg_starts, seg_slots, y)
