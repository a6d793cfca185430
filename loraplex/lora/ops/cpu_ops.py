"""SGMV ops for CPU: numba kernels for float32, the torch reference for other dtypes.

Same signatures and semantics as `torch_ops` (see its "Semantics:" docstrings). Why a kernel: a
step with many adapters has many segments, and one GEMM call per segment per projection per
layer costs more in call overhead than in arithmetic (prefill included: measured in
benchmarks/RESULTS.md). These kernels take the whole batch in one call, parallel over tokens;
tokens of a segment are adjacent, so their adapter's A and B stay in cache while it runs.
`sgmv_lora` does a packed linear's shrink and every slice's expand in one call: in small decode
batches the Python and dispatch cost of separate calls outweighed their arithmetic.
"""

from __future__ import annotations

import weakref

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


@numba.njit(parallel=True, fastmath=True, cache=True)
def _shrink_expand(x, lora_a, lora_b_t, offsets, token_slots, y):  # pragma: no cover - jitted
    """y[t, offsets[i]:offsets[i]+N_i] += (lora_a[w, i*R:(i+1)*R] @ x[t]) @ lora_b_t[i][w] for every
    slice i and every token t whose slot w >= 0. lora_b_t: a tuple of [S, R, N_i] (B transposed)."""
    stacked_rank, dim = lora_a.shape[1], lora_a.shape[2]
    rank = lora_b_t[0].shape[1]
    for t in numba.prange(x.shape[0]):
        w = token_slots[t]
        if w < 0:
            continue
        x_row = x[t]
        h = np.empty(stacked_rank, dtype=np.float32)
        for r in range(stacked_rank):
            a_row = lora_a[w, r]
            acc = np.float32(0.0)
            for d in range(dim):
                acc += a_row[d] * x_row[d]
            h[r] = acc
        for i in range(len(lora_b_t)):
            b_t = lora_b_t[i]
            n_out = b_t.shape[2]
            y_row = y[t, offsets[i] : offsets[i] + n_out]
            for r in range(rank):
                coef = h[i * rank + r]
                b_row = b_t[w, r]
                for n in range(n_out):
                    y_row[n] += coef * b_row[n]


def _use_kernel(*tensors: Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


# id(seg_slots) → (seg_starts, seg_slots, their version counters, per-token slots, the largest): every layer of
# a step passes the same few segment tensors, so their per-token expansion is computed once per
# step. The version counters (bumped by every in-place write, views included) catch buffers that
# are refilled for the next step (CUDA-graph-style static inputs); the entries hold the keys'
# tensors, so an id cannot be reused while it is cached.
_token_slot_cache: dict[int, tuple[Tensor, Tensor, tuple[int, int], np.ndarray, int]] = {}
_MAX_TOKEN_SLOT_ENTRIES = 64


def _slots_per_token(seg_starts: Tensor, seg_slots: Tensor, num_tokens: int, num_slots: int) -> np.ndarray:
    """Each token's slot (-1: none), checked to lie below `num_slots`: the kernels index
    without bounds checks."""
    if seg_starts.is_inference() or seg_slots.is_inference():  # no version counter: never cached
        slots = _token_slots(seg_starts.numpy(), seg_slots.numpy(), num_tokens)
        top = _top(slots)
    else:
        versions = (seg_starts._version, seg_slots._version)
        hit = _token_slot_cache.get(id(seg_slots))
        if hit is None or hit[0] is not seg_starts or hit[1] is not seg_slots or hit[2] != versions:
            if len(_token_slot_cache) >= _MAX_TOKEN_SLOT_ENTRIES:
                _token_slot_cache.clear()
            slots = _token_slots(seg_starts.numpy(), seg_slots.numpy(), num_tokens)
            hit = _token_slot_cache[id(seg_slots)] = (seg_starts, seg_slots, versions, slots, _top(slots))
        slots, top = hit[3], hit[4]
    if len(slots) != num_tokens:
        raise ValueError(f"the segments were expanded for {len(slots)} tokens, not {num_tokens}")
    if top >= num_slots:
        raise ValueError(f"a segment names slot {top}; there are {num_slots}")
    return slots


def _top(slots: np.ndarray) -> int:
    return int(slots.max()) if len(slots) else -1


# id(lora_a) → (weak reference to lora_a, to each B, numpy views of A and of each B transposed): a
# packed linear's slot weights are the same tensors every step, so their views are made once.
# Only zero-copy views are cached (LoraSlots' storage), so later writes into the slots show
# through. The views' base is an alias tensor, not lora_a: when lora_a dies (its engine is gone)
# the entry is dropped and the memory freed.
_weight_views: dict[int, tuple[weakref.ref, tuple[weakref.ref, ...], tuple[np.ndarray, tuple[np.ndarray, ...]]]] = {}


def _kernel_weights(lora_a: Tensor, lora_b: list[Tensor]) -> tuple[np.ndarray, tuple[np.ndarray, ...]] | None:
    """(A, B transposed per slice) as numpy arrays for `_shrink_expand`; None if not float32 on CPU."""
    hit = _weight_views.get(id(lora_a))
    if (hit is not None and hit[0]() is lora_a and len(hit[1]) == len(lora_b)
            and all(ref() is b for ref, b in zip(hit[1], lora_b))):
        return hit[2]
    if not _use_kernel(lora_a, *lora_b):
        return None
    b_t = [b.transpose(1, 2) for b in lora_b]
    views = (lora_a.view(lora_a.shape).numpy(), tuple(b.contiguous().numpy() for b in b_t))
    if lora_a.is_contiguous() and all(b.is_contiguous() for b in b_t):
        key = id(lora_a)
        forget = lambda _ref, key=key: _weight_views.pop(key, None)  # noqa: E731
        _weight_views[key] = (weakref.ref(lora_a, forget), tuple(weakref.ref(b) for b in lora_b), views)
    return views


def sgmv_shrink(x: Tensor, lora_a: Tensor, seg_starts: Tensor, seg_slots: Tensor, out: Tensor) -> None:
    """See `torch_ops.sgmv_shrink`."""
    torch_ops.check_shrink(x, lora_a, out)
    if not _use_kernel(x, lora_a, out):
        return torch_ops.sgmv_shrink(x, lora_a, seg_starts, seg_slots, out)
    token_slots = _slots_per_token(seg_starts, seg_slots, x.shape[0], lora_a.shape[0])
    _shrink(x.numpy(), lora_a.numpy(), token_slots, out.numpy())


def sgmv_expand(h: Tensor, lora_b: Tensor, seg_starts: Tensor, seg_slots: Tensor, y: Tensor, offset: int) -> None:
    """See `torch_ops.sgmv_expand`."""
    torch_ops.check_expand(h, lora_b, y, offset)
    if not _use_kernel(h, lora_b, y):
        return torch_ops.sgmv_expand(h, lora_b, seg_starts, seg_slots, y, offset)
    token_slots = _slots_per_token(seg_starts, seg_slots, h.shape[0], lora_b.shape[0])
    lora_b_t = lora_b.transpose(1, 2).contiguous()  # free for LoraSlots' [S, R, N] storage
    _expand(h.numpy(), lora_b_t.numpy(), token_slots, y.numpy(), offset)


def sgmv_lora(x, lora_a, lora_b, offsets, seg_starts, seg_slots, y) -> None:
    """See `torch_ops.sgmv_lora`: one kernel call for the shrink and every slice's expand."""
    torch_ops.check_lora(x, lora_a, lora_b, offsets, y)
    weights = _kernel_weights(lora_a, lora_b)
    if weights is None or not _use_kernel(x, y):
        return torch_ops.sgmv_lora(x, lora_a, lora_b, offsets, seg_starts, seg_slots, y)
    token_slots = _slots_per_token(seg_starts, seg_slots, x.shape[0], lora_a.shape[0])
    a, b_t = weights
    _shrink_expand(x.numpy(), a, b_t, tuple(offsets), token_slots, y.numpy())
