"""SGMV ops for CPU: numba kernels for float32, the torch reference for other dtypes.

Same signatures and semantics as `torch_ops` (see its "Semantics:" docstrings). Why a kernel: a
step with many adapters has many segments, and one GEMM call per segment per projection per
layer costs more in call overhead than in arithmetic (prefill included: measured in
benchmarks/RESULTS.md). These kernels take the whole batch in one call, parallel over tokens;
tokens of a segment are adjacent, so their adapter's A and B stay in cache while it runs.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

from . import torch_ops

@numba.njit(cache=True)
def _token_slots(seg_starts, seg_slots, num_tokens):  # pragma: no cover - jitted
    slots = np.full(num_tokens, -1, dtype=np.int64)
    for g in range(seg_slots.shape[0]):
        slots[seg_starts[g] : seg_starts[g + 1]] = seg_slots[g]
    return slots


# The kernels index through 1-D row views: numba then knows the inner loops are unit-stride with
# non-negative indices, and LLVM vectorises them (several times faster than 3-D indexing).


@numba.njit(parallel=True, fastmath=True, cache=True)
def _shrink(x, lora_a, token_slots, out):  # pragma: no cover - jitted
    """out[t] = lora_a[w] @ x[t] for every token t whose slot w >= 0. lora_a: [S, R, IN]."""
    rank, dim = lora_a.shape[1], lora_a.shape[2]
    for t in numba.prange(x.shape[0]):
        w = token_slots[t]
        if w < 0:
            continue
        x_row = x[t]
        for r in range(rank):
            a_row = lora_a[w, r]
            acc = np.float32(0.0)
            for d in range(dim):
                acc += a_row[d] * x_row[d]
            out[t, r] = acc


@numba.njit(parallel=True, fastmath=True, cache=True)
def _expand(h, lora_b_t, token_slots, y, offset):  # pragma: no cover - jitted
    """y[t, offset:offset+N] += h[t] @ lora_b_t[w] for every token t whose slot w >= 0.
    lora_b_t: [S, R, N], B transposed, so that the inner loop streams along N."""
    rank, n_out = lora_b_t.shape[1], lora_b_t.shape[2]
    for t in numba.prange(h.shape[0]):
        w = token_slots[t]
        if w < 0:
            continue
        y_row = y[t, offset : offset + n_out]
        for r in range(rank):
            coef = h[t, r]
            b_row = lora_b_t[w, r]
            for n in range(n_out):
                y_row[n] += coef * b_row[n]


def _use_kernel(*tensors: Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


# seg_slots tensor → (seg_starts, seg_slots, per-token slots): every layer of a step passes the
# same few segment tensors, so their per-token expansion is computed once per step. The entries
# hold references to the keys' tensors, so an id cannot be reused while it is cached.
_token_slot_cache: dict[int, tuple[Tensor, Tensor, np.ndarray]] = {}


def _slots_per_token(seg_starts: Tensor, seg_slots: Tensor, num_tokens: int) -> np.ndarray:
    hit = _token_slot_cache.get(id(seg_slots))
    if hit is not None and hit[0] is seg_starts and hit[1] is seg_slots:
        return hit[2]
    if any(entry[0] is not seg_starts for entry in _token_slot_cache.values()):
        _token_slot_cache.clear()  # a new step
    slots = _token_slots(seg_starts.numpy(), seg_slots.numpy(), num_tokens)
    _token_slot_cache[id(seg_slots)] = (seg_starts, seg_slots, slots)
    return slots


def sgmv_shrink(x: Tensor, lora_a: Tensor, seg_starts: Tensor, seg_slots: Tensor, out: Tensor) -> None:
    """See `torch_ops.sgmv_shrink`."""
    torch_ops.check_shrink(x, lora_a, out)
    if not _use_kernel(x, lora_a, out):
        return torch_ops.sgmv_shrink(x, lora_a, seg_starts, seg_slots, out)
    token_slots = _slots_per_token(seg_starts, seg_slots, x.shape[0])
    _shrink(x.numpy(), lora_a.numpy(), token_slots, out.numpy())


def sgmv_expand(h: Tensor, lora_b: Tensor, seg_starts: Tensor, seg_slots: Tensor, y: Tensor, offset: int) -> None:
    """See `torch_ops.sgmv_expand`."""
    torch_ops.check_expand(h, lora_b, y, offset)
    if not _use_kernel(h, lora_b, y):
        return torch_ops.sgmv_expand(h, lora_b, seg_starts, seg_slots, y, offset)
    token_slots = _slots_per_token(seg_starts, seg_slots, h.shape[0])
    lora_b_t = lora_b.transpose(1, 2).contiguous()  # free for LoraSlots' [S, R, N] storage
    _expand(h.numpy(), lora_b_t.numpy(), token_slots, y.numpy(), offset)
