"""Cases shared by the LoRA kernel tests (test_lora_ops, test_sgmv_lora, test_lora_runtime):
Punica-style segment batches by adapter popularity, weights laid out as LoraSlots keeps them, and
float64 per-token references."""

from __future__ import annotations

import numpy as np
import torch

HAS_CUDA = torch.cuda.is_available()
POPULARITY = ("distinct", "uniform", "zipf", "identical")
LENGTHS = {"decode": [1] * 12, "mixed": [1, 17, 1, 1, 33, 5, 1, 1, 24, 1, 2, 1]}
SLICES = (64, 32, 32)  # q/k/v-like output widths
N_IN, RANK, LEFT, RIGHT = 96, 8, 5, 7  # y has LEFT + sum(SLICES) + RIGHT columns


def make_batch(pop: str, lengths: list[int], num_slots: int, rng: np.random.Generator,
               num_base: int = 2, grouped: bool = True):
    """(seg_starts, seg_slots, T) for requests of `lengths` tokens with adapters drawn by `pop`.

    `num_base` requests get no adapter (-1). With `grouped`, requests are stably sorted by slot
    (as a runner would) and equal neighbours merge into one segment; without it, a slot may own
    several non-adjacent segments.
    """
    n = len(lengths)
    if pop == "distinct":
        slots = np.arange(n) % num_slots
    elif pop == "uniform":
        slots = rng.integers(0, num_slots, n)
    elif pop == "zipf":
        slots = (rng.zipf(1.5, n) - 1) % num_slots
    elif pop == "identical":
        slots = np.zeros(n, dtype=np.int64)
    else:
        raise ValueError(pop)
    slots = slots.astype(np.int64)
    slots[rng.choice(n, num_base, replace=False)] = -1
    order = np.argsort(slots, kind="stable") if grouped else np.arange(n)
    starts, seg_slots, pos = [0], [], 0
    for i in order:
        pos += lengths[i]
        if grouped and seg_slots and seg_slots[-1] == slots[i]:
            starts[-1] = pos
        else:
            seg_slots.append(int(slots[i]))
            starts.append(pos)
    as_i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    return as_i32(starts), as_i32(seg_slots), pos


def base_rows(seg_starts, seg_slots):
    st = seg_starts.tolist()
    return [t for g, w in enumerate(seg_slots.tolist()) if w < 0 for t in range(st[g], st[g + 1])]


def make_lora_weights(num_slots: int, gen: torch.Generator, dtype=torch.float32, rank: int = RANK):
    """(lora_a [S, 3R, IN], lora_b [S, N_i, R] views of [S, R, N_i] storage); slot w uses rank 1 + w % R."""
    a = torch.randn(num_slots, len(SLICES) * rank, N_IN, generator=gen) / N_IN**0.5
    b_storage = [torch.randn(num_slots, rank, n, generator=gen) / rank**0.5 for n in SLICES]
    for w in range(num_slots):
        r = 1 + w % rank
        for i, b in enumerate(b_storage):
            a[w, i * rank + r : (i + 1) * rank] = 0
            b[w, r:] = 0
    return a.to(dtype), [b.to(dtype).transpose(1, 2) for b in b_storage]


def ref_lora(x, a, bs, offsets, seg_starts, seg_slots, y):
    ref, rank = y.double().clone(), bs[0].shape[2]
    starts = seg_starts.tolist()
    for g, w in enumerate(seg_slots.tolist()):
        for t in range(starts[g], starts[g + 1]):
            if w < 0:
                continue
            for i, (b, offset) in enumerate(zip(bs, offsets)):
                h = a[w, i * rank : (i + 1) * rank].double() @ x[t].double()
                ref[t, offset : offset + b.shape[1]] += b[w].double() @ h
    return ref
