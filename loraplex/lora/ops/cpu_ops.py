"""SGMV ops for CPU: numba kernels for float32, the torch reference for other dtypes.

Same signatures and semantics as `torch_ops` (see its "Semantics:" docstrings). These kernels
take the whole batch in one call, instead of one GEMM per segment per projection per layer;
tokens of a segment are adjacent, so their adapter's A and B stay in cache while it runs.
`sgmv_lora` does a packed linear's shrink and every slice's expand in one call. An engine goes
further: it prepares the arguments once (`kernel_weights` per linear, `token_slots` per step)
and calls `lora_delta`.

Threads: calls of fewer than PARALLEL_MIN_TOKENS tokens (decode steps) run serially on the
calling thread; larger ones (prefill) share their pieces of work among numba's threads. Both
drivers split a batch the same way, so a token's delta is bitwise the same in either. numba's
`omp` layer binds to the OpenMP runtime torch bundles once torch is loaded, and both launch from
the engine's thread, so they share its worker threads (as the paged-attention kernel does).
Why these choices, with the measurements: benchmarks/RESULTS.md, "LoRA cost inside one model step".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numba
import numpy as np
import torch
from torch import Tensor

from . import torch_ops

PARALLEL_MIN_TOKENS = 64  # calls this large go to `_shrink_expand_parallel` (see above)


@numba.njit(cache=True)
def _token_slots(seg_starts, seg_slots, num_tokens):  # pragma: no cover - jitted
    slots = np.full(num_tokens, -1, dtype=np.int64)
    for g in range(seg_slots.shape[0]):
        slots[seg_starts[g] : seg_starts[g + 1]] = seg_slots[g]
    return slots


# The kernels index through 1-D row views: numba then knows the inner loops are unit-stride with
# non-negative indices, and LLVM vectorises them.


@numba.njit(fastmath=True, cache=True)
def _shrink(x, lora_a, token_slots, out):  # pragma: no cover - jitted
    """out[t] = lora_a[w] @ x[t] for every token t whose slot w >= 0. lora_a: [S, R, IN]."""
    rank, dim = lora_a.shape[1], lora_a.shape[2]
    for t in range(x.shape[0]):
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


@numba.njit(fastmath=True, cache=True)
def _expand(h, lora_b_t, token_slots, y, offset):  # pragma: no cover - jitted
    """y[t, offset:offset+N] += h[t] @ lora_b_t[w] for every token t whose slot w >= 0.
    lora_b_t: [S, R, N], B transposed, so that the inner loop streams along N."""
    rank, n_out = lora_b_t.shape[1], lora_b_t.shape[2]
    for t in range(h.shape[0]):
        w = token_slots[t]
        if w < 0:
            continue
        y_row = y[t, offset : offset + n_out]
        for r in range(rank):
            coef = h[t, r]
            b_row = lora_b_t[w, r]
            for n in range(n_out):
                y_row[n] += coef * b_row[n]


@numba.njit(fastmath=True, cache=True)
def _lora_token(x, lora_a, lora_b_t, offsets, w, t, y, h):  # pragma: no cover - jitted
    """Token t's delta through slot w (see `_shrink_expand`); h: [n*R] scratch."""
    rank, dim = lora_b_t[0].shape[1], lora_a.shape[2]
    x_row = x[t]
    for r in range(lora_a.shape[1]):
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


@numba.njit(fastmath=True, cache=True)
def _lora_block4(x, lora_a, lora_b_t, offsets, w, t, y, h):  # pragma: no cover - jitted
    """Tokens t..t+3's deltas, all through slot w: each row of A and B is loaded once for the
    four (see benchmarks/RESULTS.md); h: [4, n*R] scratch."""
    rank, dim = lora_b_t[0].shape[1], lora_a.shape[2]
    x0, x1, x2, x3 = x[t], x[t + 1], x[t + 2], x[t + 3]
    for r in range(lora_a.shape[1]):
        a_row = lora_a[w, r]
        s0, s1, s2, s3 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
        for d in range(dim):
            a = a_row[d]
            s0 += a * x0[d]
            s1 += a * x1[d]
            s2 += a * x2[d]
            s3 += a * x3[d]
        h[0, r], h[1, r], h[2, r], h[3, r] = s0, s1, s2, s3
    for i in range(len(lora_b_t)):
        b_t = lora_b_t[i]
        lo, hi = offsets[i], offsets[i] + b_t.shape[2]
        y0, y1, y2, y3 = y[t, lo:hi], y[t + 1, lo:hi], y[t + 2, lo:hi], y[t + 3, lo:hi]
        for r in range(rank):
            k = i * rank + r
            c0, c1, c2, c3 = h[0, k], h[1, k], h[2, k], h[3, k]
            b_row = b_t[w, r]
            for n in range(hi - lo):
                b = b_row[n]
                y0[n] += c0 * b
                y1[n] += c1 * b
                y2[n] += c2 * b
                y3[n] += c3 * b


@numba.njit(cache=True)
def _work_items(token_slots):  # pragma: no cover - jitted
    """The first token of each piece of work: four tokens in a row on one slot go together (see
    `_lora_block4`), the others one by one; tokens without a slot are skipped. Both drivers below
    split the batch this way, so a token's delta is the same bitwise whichever runs it."""
    starts = np.empty(token_slots.shape[0], dtype=np.int64)
    sizes = np.empty(token_slots.shape[0], dtype=np.int64)
    n, t, num_tokens = 0, 0, token_slots.shape[0]
    while t < num_tokens:
        w = token_slots[t]
        size = 1
        if (w >= 0 and t + 4 <= num_tokens and token_slots[t + 1] == w and token_slots[t + 2] == w
                and token_slots[t + 3] == w):
            size = 4
        if w >= 0:
            starts[n], sizes[n] = t, size
            n += 1
        t += size
    return starts[:n], sizes[:n]


@numba.njit(fastmath=True, cache=True)
def _lora_item(x, lora_a, lora_b_t, offsets, token_slots, y, start, size, h):  # pragma: no cover - jitted
    if size == 4:
        _lora_block4(x, lora_a, lora_b_t, offsets, token_slots[start], start, y, h)
    else:
        _lora_token(x, lora_a, lora_b_t, offsets, token_slots[start], start, y, h[0])


@numba.njit(fastmath=True, cache=True)
def _shrink_expand(x, lora_a, lora_b_t, offsets, token_slots, y):  # pragma: no cover - jitted
    """y[t, offsets[i]:offsets[i]+N_i] += (lora_a[w, i*R:(i+1)*R] @ x[t]) @ lora_b_t[i][w] for every
    slice i and every token t whose slot w >= 0. lora_b_t: a tuple of [S, R, N_i] (B transposed).
    Serial, piece by piece (`_work_items`)."""
    h = np.empty((4, lora_a.shape[1]), dtype=np.float32)
    starts, sizes = _work_items(token_slots)
    for j in range(starts.shape[0]):
        _lora_item(x, lora_a, lora_b_t, offsets, token_slots, y, starts[j], sizes[j], h)


@numba.njit(fastmath=True, cache=True, parallel=True)
def _shrink_expand_parallel(x, lora_a, lora_b_t, offsets, token_slots, y):  # pragma: no cover - jitted
    """`_shrink_expand` with the pieces shared out among numba's threads (each writes only its
    tokens' rows of y)."""
    starts, sizes = _work_items(token_slots)
    for j in numba.prange(starts.shape[0]):
        h = np.empty((4, lora_a.shape[1]), dtype=np.float32)
        _lora_item(x, lora_a, lora_b_t, offsets, token_slots, y, starts[j], sizes[j], h)


def _use_kernel(*tensors: Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


class KernelWeights(NamedTuple):
    """One packed linear's slot weights as numpy views for `lora_delta`: zero-copy, so that
    later in-place loads into the slots show through. a: [S, n*R, IN]; b_t[i]: [S, R, N_i]
    (slice i's B transposed); offsets[i]: slice i's first column in y."""

    a: np.ndarray
    b_t: tuple[np.ndarray, ...]
    offsets: tuple[int, ...]


def kernel_weights(lora_a: Tensor, lora_b: Sequence[Tensor], offsets: Sequence[int]) -> KernelWeights | None:
    """Views of float32 CPU weights whose B is stored transposed ([S, R, N], as LoraSlots stores
    it); None for anything else (another dtype or device, or a layout that would need a copy)."""
    b_t = [b.transpose(1, 2) for b in lora_b]
    if not (_use_kernel(lora_a, *lora_b) and lora_a.is_contiguous() and all(b.is_contiguous() for b in b_t)):
        return None
    return KernelWeights(lora_a.numpy(), tuple(b.numpy() for b in b_t), tuple(offsets))


def compile_kernels(weights: Iterable[KernelWeights]) -> None:
    """Compile both drivers (or load them from numba's on-disk cache) for the argument types of
    `weights`, so that no request waits for it: a first compile takes seconds per type (one per
    number of slices), a cached load a fraction of one. Runs them, and `token_slots`, on zero tokens."""
    _token_slots(np.zeros(1, dtype=np.int32), np.zeros(0, dtype=np.int32), 0)  # int32, as a LoraBatch holds
    done = set()
    for w in weights:
        if len(w.b_t) in done:
            continue
        done.add(len(w.b_t))
        x = np.zeros((0, w.a.shape[2]), dtype=np.float32)
        y = np.zeros((0, w.offsets[-1] + w.b_t[-1].shape[2]), dtype=np.float32)
        for kernel in (_shrink_expand, _shrink_expand_parallel):
            kernel(x, w.a, w.b_t, w.offsets, np.zeros(0, dtype=np.int64), y)


def token_slots(seg_starts: Tensor, seg_slots: Tensor, num_tokens: int, num_slots: int) -> np.ndarray:
    """Each token's slot (-1: none), checked to lie below `num_slots` (the kernels index without
    bounds checks). An engine expands each step's segments once, for all its layers."""
    slots = _token_slots(seg_starts.numpy(), seg_slots.numpy(), num_tokens)
    top = int(slots.max()) if num_tokens else -1
    if top >= num_slots:
        raise ValueError(f"a segment names slot {top}; there are {num_slots}")
    return slots


def lora_delta(x: Tensor, weights: KernelWeights, slots: np.ndarray, y: Tensor) -> None:
    """`sgmv_lora` with its arguments prepared (`kernel_weights` once per linear, `token_slots`
    once per step): y += each token's LoRA delta, in one kernel call and no other work.
    x [T, IN] and y [T, OUT] float32 on CPU; slots [T] from `token_slots` for these T tokens."""
    if len(slots) != x.shape[0]:
        raise ValueError(f"the segments were expanded for {len(slots)} tokens, not {x.shape[0]}")
    kernel = _shrink_expand_parallel if x.shape[0] >= PARALLEL_MIN_TOKENS else _shrink_expand
    kernel(x.numpy(), weights.a, weights.b_t, weights.offsets, slots, y.numpy())


def sgmv_shrink(x: Tensor, lora_a: Tensor, seg_starts: Tensor, seg_slots: Tensor, out: Tensor) -> None:
    """See `torch_ops.sgmv_shrink`."""
    torch_ops.check_shrink(x, lora_a, out)
    if not _use_kernel(x, lora_a, out):
        return torch_ops.sgmv_shrink(x, lora_a, seg_starts, seg_slots, out)
    slots = token_slots(seg_starts, seg_slots, x.shape[0], lora_a.shape[0])
    _shrink(x.numpy(), lora_a.numpy(), slots, out.numpy())


def sgmv_expand(h: Tensor, lora_b: Tensor, seg_starts: Tensor, seg_slots: Tensor, y: Tensor, offset: int) -> None:
    """See `torch_ops.sgmv_expand`."""
    torch_ops.check_expand(h, lora_b, y, offset)
    if not _use_kernel(h, lora_b, y):
        return torch_ops.sgmv_expand(h, lora_b, seg_starts, seg_slots, y, offset)
    slots = token_slots(seg_starts, seg_slots, h.shape[0], lora_b.shape[0])
    lora_b_t = lora_b.transpose(1, 2).contiguous()  # free for LoraSlots' [S, R, N] storage
    _expand(h.numpy(), lora_b_t.numpy(), slots, y.numpy(), offset)


def sgmv_lora(x, lora_a, lora_b, offsets, seg_starts, seg_slots, y) -> None:
    """See `torch_ops.sgmv_lora`: one kernel call for the shrink and every slice's expand. An
    engine prepares the arguments once instead and calls `lora_delta` (see `CpuLoraRuntime`)."""
    torch_ops.check_lora(x, lora_a, lora_b, offsets, y)
    if not _use_kernel(x, y, lora_a, *lora_b):
        return torch_ops.sgmv_lora(x, lora_a, lora_b, offsets, seg_starts, seg_slots, y)
    b_t = tuple(b.transpose(1, 2).contiguous().numpy() for b in lora_b)  # free for [S, R, N] storage
    weights = KernelWeights(lora_a.contiguous().numpy(), b_t, tuple(offsets))
    lora_delta(x, weights, token_slots(seg_starts, seg_slots, x.shape[0], lora_a.shape[0]), y)
