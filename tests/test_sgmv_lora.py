"""`sgmv_lora` (a packed linear's whole LoRA delta in one op) against a float64 per-token loop.

Weights are laid out as LoraSlots keeps them: A of the slices stacked along the rank axis, each
B a transposed view of [S, R, N] storage, mixed ranks zero-padded, base-only segments mixed in,
y wider than the slices (columns outside them must stay untouched).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loraplex.lora.ops import cpu_ops, torch_ops
from lora_cases import HAS_CUDA, LEFT, LENGTHS, N_IN, POPULARITY, RANK, RIGHT, SLICES, base_rows, make_batch, make_lora_weights, ref_lora


def lora_case(mod, pop, lengths, *, seed=0, dtype=torch.float32, device="cpu", tol=1e-5, rank=RANK):
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    num_slots = len(lengths) if pop == "distinct" else 6
    seg_starts, seg_slots, t = make_batch(pop, lengths, num_slots, rng)
    a, bs = make_lora_weights(num_slots, gen, dtype, rank)
    offsets = [LEFT + sum(SLICES[:i]) for i in range(len(SLICES))]
    x = torch.randn(t, N_IN, generator=gen).to(dtype)
    y0 = torch.randn(t, LEFT + sum(SLICES) + RIGHT, generator=gen).to(dtype)
    y = y0.to(device, copy=True)
    mod.sgmv_lora(x.to(device), a.to(device), [b.to(device) for b in bs], offsets,
                  seg_starts.to(device), seg_slots.to(device), y)
    ref = ref_lora(x, a, bs, offsets, seg_starts, seg_slots, y0)
    torch.testing.assert_close(y.cpu().double(), ref, atol=tol, rtol=tol)
    rows = base_rows(seg_starts, seg_slots)
    assert rows and torch.equal(y.cpu()[rows], y0[rows])
    assert torch.equal(y.cpu()[:, :LEFT], y0[:, :LEFT]) and torch.equal(y.cpu()[:, -RIGHT:], y0[:, -RIGHT:])


@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("pop", POPULARITY)
@pytest.mark.parametrize("mod", [torch_ops, cpu_ops], ids=["torch", "cpu"])
def test_sgmv_lora_fp32(mod, pop, lengths):
    lora_case(mod, pop, LENGTHS[lengths], seed=hash((pop, lengths)) % 1000)


@pytest.mark.parametrize("rank", [1, 3])
def test_cpu_sgmv_lora_odd_ranks(rank):
    """Odd stacked row counts and odd ranks, through the four-token path and the one-token path."""
    lora_case(cpu_ops, "zipf", LENGTHS["mixed"], seed=11 + rank, rank=rank)
    lora_case(cpu_ops, "identical", [5, 4, 1, 9], seed=rank, rank=rank)


def test_cpu_sgmv_lora_hands_bf16_to_the_reference():
    # shrink accumulates in fp32 and expand rounds once to bf16 per slice
    lora_case(cpu_ops, "zipf", LENGTHS["mixed"], dtype=torch.bfloat16, seed=3, tol=2e-2)


def test_cpu_sgmv_lora_takes_b_in_either_layout():
    """B as transposed views of [S, R, N] storage (LoraSlots' layout, used as is) or as plain
    [S, N, R] tensors (copied for the kernel): the same delta."""
    gen = torch.Generator().manual_seed(4)
    seg_starts, seg_slots = torch.tensor([0, 3, 5], dtype=torch.int32), torch.tensor([1, 0], dtype=torch.int32)
    offsets = [LEFT + sum(SLICES[:i]) for i in range(len(SLICES))]
    x = torch.randn(5, N_IN, generator=gen)
    a, slot_bs = make_lora_weights(2, gen)
    y0 = torch.randn(5, LEFT + sum(SLICES) + RIGHT, generator=gen)
    for bs in (slot_bs, [b.contiguous() for b in slot_bs]):
        y = y0.clone()
        cpu_ops.sgmv_lora(x, a, bs, offsets, seg_starts, seg_slots, y)
        torch.testing.assert_close(y.double(), ref_lora(x, a, bs, offsets, seg_starts, seg_slots, y0), atol=1e-5, rtol=1e-5)


def test_sgmv_lora_shape_errors():
    a, bs = make_lora_weights(2, torch.Generator().manual_seed(0))
    x, y = torch.randn(3, N_IN), torch.zeros(3, sum(SLICES))
    starts, slots = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    offsets = [0, 64, 96]
    bad = {
        "offsets count": (x, a, bs, offsets[:2], y),
        "stacked rank": (x, a[:, : 2 * RANK], bs, offsets, y),
        "input width": (x[:, :-1], a, bs, offsets, y),
        "slice past y": (x, a, bs, [0, 64, 97], y),
        "token count": (x[:2], a, bs, offsets, y),
    }
    for mod in (torch_ops, cpu_ops):
        for name, (xx, aa, bb, oo, yy) in bad.items():
            with pytest.raises(ValueError):
                mod.sgmv_lora(xx, aa, bb, oo, starts, slots, yy)
            assert (y == 0).all(), name


def test_cpu_ops_refuse_a_slot_past_the_weights():
    a, bs = make_lora_weights(2, torch.Generator().manual_seed(0))
    x, y = torch.randn(3, N_IN), torch.zeros(3, sum(SLICES))
    starts, slots = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([2], dtype=torch.int32)  # slots 0, 1 exist
    with pytest.raises(ValueError, match="slot 2"):
        cpu_ops.sgmv_lora(x, a, bs, [0, 64, 96], starts, slots, y)
    with pytest.raises(ValueError, match="slot 2"):
        cpu_ops.sgmv_shrink(x, a, starts, slots, torch.empty(3, a.shape[1]))
    assert (y == 0).all()


@pytest.mark.parametrize("pop", ["distinct", "zipf"])
def test_triton_interpreted_sgmv_lora(interp, pop):
    lora_case(interp, pop, LENGTHS["mixed"], seed=21)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_triton_cuda_sgmv_lora_bf16():
    from loraplex.lora.ops import triton_ops

    for i, pop in enumerate(POPULARITY):
        lora_case(triton_ops, pop, [1] * 40 + [300, 77, 16], seed=300 + i, dtype=torch.bfloat16, device="cuda", tol=2e-2)


def test_cpu_sgmv_lora_is_batch_invariant():
    """A token's delta is bitwise the same whether it runs alone, with three more tokens of its
    adapter (the four-token path), or in a batch large enough to be shared among threads: a
    request's greedy output must not depend on its batch."""
    gen = torch.Generator().manual_seed(5)
    a, bs = make_lora_weights(3, gen)
    offsets = [LEFT + sum(SLICES[:i]) for i in range(len(SLICES))]
    width = LEFT + sum(SLICES) + RIGHT
    lengths, slots = [4, 1, 9, 3, 1, 6, 1, 4] * 8, [1, 2, 0, 1, -1, 2, 0, 1] * 8  # slot -1: base-only
    assert sum(lengths) >= cpu_ops.PARALLEL_MIN_TOKENS
    seg_starts = torch.tensor(np.cumsum([0] + lengths), dtype=torch.int32)
    seg_slots = torch.tensor(slots, dtype=torch.int32)
    x = torch.randn(sum(lengths), N_IN, generator=gen)
    batch = torch.zeros(len(x), width)
    cpu_ops.sgmv_lora(x, a, bs, offsets, seg_starts, seg_slots, batch)
    for t in range(len(x)):
        slot = seg_slots[torch.searchsorted(seg_starts, t, right=True) - 1]
        alone = torch.zeros(1, width)
        cpu_ops.sgmv_lora(x[t : t + 1], a, bs, offsets, torch.tensor([0, 1], dtype=torch.int32), slot.reshape(1), alone)
        assert torch.equal(alone[0], batch[t]), t
