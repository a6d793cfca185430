"""Reference SGMV ops in plain PyTorch (also the fallback of the other backends for inputs they do not take).

Both ops loop over the (few) segments of a batch and run one GEMM per segment with an
adapter; `sgmv_lora` is one LoRA linear's whole delta (a shrink, then an expand per slice). The
other backends (`cpu_ops.py`, `triton_ops.py`) keep exactly these signatures and semantics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def segments(seg_starts: Tensor, seg_slots: Tensor) -> list[tuple[int, int, int]]:
    """`(start, end, slot)` of every non-empty segment with an adapter (slot >= 0).

    Reads both index tensors to the host once (a single transfer when they live on a GPU).
    """
    g = seg_slots.numel()
    if seg_starts.numel() != g + 1:
        raise ValueError(f"seg_starts must have {g + 1} entries (G+1), got {seg_starts.numel()}")
    if seg_starts.is_cuda:
        flat = torch.cat([seg_starts.to(torch.int64), seg_slots.to(torch.int64)]).tolist()
        starts, slots = flat[: g + 1], flat[g + 1 :]
    else:
        starts, slots = seg_starts.tolist(), seg_slots.tolist()
    return [(starts[i], starts[i + 1], w) for i, w in enumerate(slots) if w >= 0 and starts[i + 1] > starts[i]]


def check_shrink(x: Tensor, lora_a: Tensor, out: Tensor) -> None:
    if x.dim() != 2 or lora_a.dim() != 3 or out.dim() != 2:
        raise ValueError("sgmv_shrink wants x [T, IN], lora_a [S, R, IN], out [T, R]")
    if lora_a.shape[2] != x.shape[1] or out.shape != (x.shape[0], lora_a.shape[1]):
        raise ValueError(f"sgmv_shrink shapes disagree: x {tuple(x.shape)}, lora_a {tuple(lora_a.shape)}, out {tuple(out.shape)}")
    if out.dtype != torch.float32:
        raise TypeError(f"sgmv_shrink: out must be float32, got {out.dtype}")


def check_expand(h: Tensor, lora_b: Tensor, y: Tensor, offset: int) -> None:
    if h.dim() != 2 or lora_b.dim() != 3 or y.dim() != 2:
        raise ValueError("sgmv_expand wants h [T, R], lora_b [S, N, R], y [T, OUT]")
    if lora_b.shape[2] != h.shape[1] or y.shape[0] != h.shape[0] or not 0 <= offset <= y.shape[1] - lora_b.shape[1]:
        raise ValueError(f"sgmv_expand shapes disagree: h {tuple(h.shape)}, lora_b {tuple(lora_b.shape)}, y {tuple(y.shape)}, offset {offset}")
    if h.dtype != torch.float32:
        raise TypeError(f"sgmv_expand: h must be float32, got {h.dtype}")


def check_lora(x: Tensor, lora_a: Tensor, lora_b: Sequence[Tensor], offsets: Sequence[int], y: Tensor) -> None:
    if not lora_b or len(lora_b) != len(offsets):
        raise ValueError(f"sgmv_lora wants one offset per B slice, got {len(lora_b)} slices, {len(offsets)} offsets")
    rank = lora_b[0].shape[-1]
    if (x.dim() != 2 or lora_a.dim() != 3 or y.dim() != 2 or lora_a.shape[2] != x.shape[1]
            or lora_a.shape[1] != len(lora_b) * rank or y.shape[0] != x.shape[0]):
        raise ValueError(f"sgmv_lora shapes disagree: x {tuple(x.shape)}, lora_a {tuple(lora_a.shape)}, "
                         f"{len(lora_b)} slices of rank {rank}, y {tuple(y.shape)}")
    for b, offset in zip(lora_b, offsets):
        if b.dim() != 3 or b.shape[0] != lora_a.shape[0] or b.shape[2] != rank or not 0 <= offset <= y.shape[1] - b.shape[1]:
            raise ValueError(f"sgmv_lora: slice B {tuple(b.shape)} at offset {offset} does not fit y {tuple(y.shape)}")


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
        lora_a     [S, R, IN] model dtype; S slots, R = rank capacity (slices' ranks concatenated,
                              e.g. 3*r for fused q/k/v; smaller ranks zero-padded)
        seg_starts [G + 1]    int32, on x.device; seg_starts[0] = 0, seg_starts[G] = T, non-decreasing
        seg_slots  [G]        int32, on x.device; slot of each segment, -1 = no adapter
        out        [T, R]     float32, written in place
    """
    check_shrink(x, lora_a, out)
    fast = x.dtype == torch.float32 and lora_a.dtype == torch.float32
    for s, e, w in segments(seg_starts, seg_slots):
        a_t = lora_a[w].t() if fast else lora_a[w].t().float()
        xs = x[s:e] if fast else x[s:e].float()
        torch.mm(xs, a_t, out=out[s:e])


def sgmv_expand(h: Tensor, lora_b: Tensor, seg_starts: Tensor, seg_slots: Tensor, y: Tensor, offset: int) -> None:
    """Project each segment's low-rank activations up through its adapter's B, adding into y.

    Semantics:
        for g in range(G):
            s, e, w = seg_starts[g], seg_starts[g + 1], seg_slots[g]
            if w >= 0:
                y[s:e, offset:offset + N] = (y[s:e, offset:offset + N].float()
                                             + h[s:e] @ lora_b[w].float().T).to(y.dtype)
        # i.e. y[...] += (h @ B.T) with one rounding to y.dtype; rows of w == -1 segments and
        # columns outside [offset, offset + N) are left untouched

    Shapes:
        h          [T, R]     float32; may be a strided view (e.g. a column slice of [T, 3*R])
        lora_b     [S, N, R]  model dtype (scaling already folded in)
        seg_starts [G + 1]    int32, on h.device
        seg_slots  [G]        int32, on h.device; -1 = no adapter
        y          [T, OUT]   model dtype, OUT >= offset + N, updated in place
        offset     int        first output column of this slice
    """
    check_expand(h, lora_b, y, offset)
    n = lora_b.shape[1]
    fast = y.dtype == torch.float32 and lora_b.dtype == torch.float32
    for s, e, w in segments(seg_starts, seg_slots):
        ys = y[s:e, offset : offset + n]
        if fast:
            ys.addmm_(h[s:e], lora_b[w].t())
        else:
            ys.add_(torch.mm(h[s:e], lora_b[w].t().float()))


def sgmv_lora(
    x: Tensor, lora_a: Tensor, lora_b: Sequence[Tensor], offsets: Sequence[int],
    seg_starts: Tensor, seg_slots: Tensor, y: Tensor,
) -> None:
    """One packed LoRA linear's whole delta: a shrink through the slices' stacked A, then one
    expand per slice into its columns of y.

    Semantics:
        R = lora_b[0].shape[2]
        h = empty(T, len(lora_b) * R, float32)
        sgmv_shrink(x, lora_a, seg_starts, seg_slots, h)
        for i, (b, offset) in enumerate(zip(lora_b, offsets)):
            sgmv_expand(h[:, i * R : (i + 1) * R], b, seg_starts, seg_slots, y, offset)

    Shapes:
        x          [T, IN]              model dtype
        lora_a     [S, n * R, IN]       the n slices' A stacked along the rank axis
        lora_b[i]  [S, N_i, R]          slice i's B (scaling folded in)
        offsets[i] int                  first column of slice i in y
        seg_starts [G + 1], seg_slots [G]   as in sgmv_shrink
        y          [T, OUT]             model dtype, updated in place
    """
    shrink_then_expand(sgmv_shrink, sgmv_expand, x, lora_a, lora_b, offsets, seg_starts, seg_slots, y)


def shrink_then_expand(
    shrink: Callable, expand: Callable, x: Tensor, lora_a: Tensor, lora_b: Sequence[Tensor],
    offsets: Sequence[int], seg_starts: Tensor, seg_slots: Tensor, y: Tensor,
) -> None:
    """`sgmv_lora` composed from a backend's `shrink` and `expand` (see its Semantics)."""
    check_lora(x, lora_a, lora_b, offsets, y)
    rank = lora_b[0].shape[2]
    h = torch.empty(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    shrink(x, lora_a, seg_starts, seg_slots, h)
    for i, (b, offset) in enumerate(zip(lora_b, offsets)):
        expand(h[:, i * rank : (i + 1) * rank], b, seg_starts, seg_slots, y, offset)
