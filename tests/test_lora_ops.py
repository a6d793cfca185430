"""SGMV shrink/expand against a float64 per-token reference loop (Punica-style cases).

Cases: rank (1, 2, 8, 16, mixed ranks zero-padded to R, fused 3*r) x adapter popularity
(distinct, uniform, zipf(1.5), identical) with base-only (-1) segments mixed in, decode-only
and mixed prefill/decode batches. The Triton kernels run under Triton's interpreter on CPU
(a private copy of `triton_ops` loaded with TRITON_INTERPRET=1, so the process-wide module and
other tests are unaffected), and compiled on CUDA in the `cuda`-marked test.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from loraplex.lora import ops
from loraplex.lora.ops import cpu_ops, torch_ops
from lora_cases import HAS_CUDA, LENGTHS, POPULARITY, base_rows, make_batch

RANKS = {"r1": (1,), "r2": (2,), "r8": (8,), "r16": (16,), "mixed": (1, 2, 8, 16)}




# ---------------------------------------------------------------- batches and weights


def make_weights(num_slots: int, ranks: tuple[int, ...], n_in: int, n_out: int, gen: torch.Generator):
    """A [S, R, IN], B [S, N, R] with slot w using rank ranks[w % len] (zero-padded to R=max)."""
    rank_cap = max(ranks)
    a = torch.randn(num_slots, rank_cap, n_in, generator=gen) / n_in**0.5
    b = torch.randn(num_slots, n_out, rank_cap, generator=gen)
    for w in range(num_slots):
        r = ranks[w % len(ranks)]
        a[w, r:] = 0
        b[w, :, r:] = 0
        b[w] /= r**0.5
    return a, b


# ---------------------------------------------------------------- float64 reference


def ref_shrink(x, a, seg_starts, seg_slots, out):
    ref = out.double().clone()
    st = seg_starts.tolist()
    for g, w in enumerate(seg_slots.tolist()):
        if w >= 0:
            for t in range(st[g], st[g + 1]):
                ref[t] = a[w].double() @ x[t].double()
    return ref


def ref_expand(h, b, seg_starts, seg_slots, y, offset):
    ref = y.double().clone()
    st, n = seg_starts.tolist(), b.shape[1]
    for g, w in enumerate(seg_slots.tolist()):
        if w >= 0:
            for t in range(st[g], st[g + 1]):
                ref[t, offset : offset + n] += b[w].double() @ h[t].double()
    return ref


def check_case(mod, pop, ranks, lengths, *, n_in=96, n_out=80, dtype=torch.float32, grouped=True,
               seed=0, device="cpu", shrink_tol=1e-5, expand_tol=1e-5):
    """Run shrink then expand (into a column window of a wider y) and compare to the reference."""
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    num_slots = len(lengths) if pop == "distinct" else 6
    seg_starts, seg_slots, t = make_batch(pop, lengths, num_slots, rng, grouped=grouped)
    a, b = make_weights(num_slots, ranks, n_in, n_out, gen)
    x = torch.randn(t, n_in, generator=gen)
    out0 = torch.randn(t, a.shape[1], generator=gen)
    y0 = torch.randn(t, n_out + 24, generator=gen)
    x, a, b, y0 = (v.to(dtype) for v in (x, a, b, y0))
    to = lambda v: v.to(device)  # noqa: E731
    seg_starts_d, seg_slots_d = to(seg_starts), to(seg_slots)

    out = to(out0).clone()
    mod.sgmv_shrink(to(x), to(a), seg_starts_d, seg_slots_d, out)
    ref = ref_shrink(x, a, seg_starts, seg_slots, out0)
    torch.testing.assert_close(out.cpu().double(), ref, atol=shrink_tol, rtol=shrink_tol)

    # expand reads h from a strided column window of a wider tensor
    h_wide = torch.randn(t, a.shape[1] + 5, generator=gen)
    h = h_wide[:, 3 : 3 + a.shape[1]]
    y = to(y0).clone()
    mod.sgmv_expand(to(h_wide)[:, 3 : 3 + a.shape[1]], to(b), seg_starts_d, seg_slots_d, y, 16)
    ref_y = ref_expand(h, b, seg_starts, seg_slots, y0, 16)
    torch.testing.assert_close(y.cpu().double(), ref_y, atol=expand_tol, rtol=expand_tol)

    rows = base_rows(seg_starts, seg_slots)
    assert rows, "every case mixes in base-only segments"
    assert torch.equal(out.cpu()[rows], out0[rows]) and torch.equal(y.cpu()[rows], y0[rows])


# ---------------------------------------------------------------- torch backend


@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("pop", POPULARITY)
@pytest.mark.parametrize("rank", RANKS)
def test_torch_ops_fp32(rank, pop, lengths):
    check_case(torch_ops, pop, RANKS[rank], LENGTHS[lengths], seed=len(rank) + len(pop))


@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("pop", POPULARITY)
@pytest.mark.parametrize("rank", RANKS)
def test_cpu_kernels_fp32(rank, pop, lengths):
    check_case(cpu_ops, pop, RANKS[rank], LENGTHS[lengths], seed=len(rank) + len(pop))


def test_cpu_ops_hands_half_precision_to_the_reference():
    check_case(cpu_ops, "uniform", RANKS["mixed"], LENGTHS["mixed"], dtype=torch.bfloat16, seed=4, expand_tol=1e-2)


@pytest.mark.parametrize("pop", ["uniform", "zipf"])
def test_torch_ops_ungrouped_segments(pop):
    check_case(torch_ops, pop, RANKS["mixed"], LENGTHS["mixed"], grouped=False, seed=3)


@pytest.mark.parametrize("pop", POPULARITY)
def test_torch_ops_bf16(pop):
    # inputs are exact bf16 values and shrink accumulates in fp32, so it stays tight;
    # expand rounds once to bf16 (half an ulp of O(1) values is <= 2**-8)
    check_case(torch_ops, pop, RANKS["mixed"], LENGTHS["mixed"], dtype=torch.bfloat16,
               seed=11, shrink_tol=1e-5, expand_tol=1e-2)


def fused_expand_case(mod, device="cpu", dtype=torch.float32, tol=1e-5, seed=5):
    """q/k/v slices: one shrink into [T, 3r], then three expands at column offsets."""
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    r, n_in, outs = 8, 64, (64, 32, 32)
    seg_starts, seg_slots, t = make_batch("zipf", LENGTHS["mixed"], 4, rng)
    x = torch.randn(t, n_in, generator=gen).to(dtype)
    a = (torch.randn(4, 3 * r, n_in, generator=gen) / n_in**0.5).to(dtype)
    bs = [(torch.randn(4, n, r, generator=gen) / r**0.5).to(dtype) for n in outs]
    y0 = torch.randn(t, sum(outs), generator=gen).to(dtype)
    to = lambda v: v.to(device)  # noqa: E731

    h = torch.zeros(t, 3 * r, device=device)
    mod.sgmv_shrink(to(x), to(a), to(seg_starts), to(seg_slots), h)
    ref_h = ref_shrink(x, a, seg_starts, seg_slots, torch.zeros(t, 3 * r))
    torch.testing.assert_close(h.cpu().double(), ref_h, atol=tol, rtol=tol)

    y, ref, offset = to(y0).clone(), y0.double(), 0
    for i, (n, b) in enumerate(zip(outs, bs)):
        mod.sgmv_expand(h[:, i * r : (i + 1) * r], to(b), to(seg_starts), to(seg_slots), y, offset)
        ref = ref_expand(h.cpu()[:, i * r : (i + 1) * r], b, seg_starts, seg_slots, ref, offset)
        offset += n
    torch.testing.assert_close(y.cpu().double(), ref, atol=tol, rtol=tol)
    rows = base_rows(seg_starts, seg_slots)
    assert torch.equal(y.cpu()[rows], y0[rows])


def test_torch_ops_fused_slices():
    fused_expand_case(torch_ops)


def edge_cases(mod):
    x, a, b = torch.randn(5, 32), torch.randn(2, 4, 32), torch.randn(2, 16, 4)
    # empty segment, then all rows base-only: nothing may be written
    starts, slots = torch.tensor([0, 0, 5], dtype=torch.int32), torch.tensor([1, -1], dtype=torch.int32)
    out, y = torch.full((5, 4), 7.0), torch.full((5, 16), 3.0)
    mod.sgmv_shrink(x, a, starts, slots, out)
    mod.sgmv_expand(torch.randn(5, 4), b, starts, slots, y, 0)
    assert (out == 7).all() and (y == 3).all()
    # no tokens at all
    empty = torch.tensor([0], dtype=torch.int32)
    mod.sgmv_shrink(x[:0], a, empty, empty[:0], out[:0])
    mod.sgmv_expand(torch.randn(0, 4), b, empty, empty[:0], y[:0], 0)


def test_torch_ops_edge_cases():
    edge_cases(torch_ops)


def test_cpu_ops_edge_cases():
    edge_cases(cpu_ops)


def test_backend_selection():
    assert ops.select_backend("cpu") is cpu_ops
    assert ops.backend is ops.select_backend()
    assert ops.sgmv_shrink is ops.backend.sgmv_shrink and ops.sgmv_expand is ops.backend.sgmv_expand
    if not HAS_CUDA:
        assert ops.select_backend("cuda") is torch_ops  # no device to launch kernels on


def test_shape_errors():
    with pytest.raises(ValueError):
        torch_ops.sgmv_shrink(torch.randn(3, 8), torch.randn(2, 4, 9), torch.tensor([0, 3]), torch.tensor([0]),
                              torch.empty(3, 4))
    with pytest.raises(ValueError):
        torch_ops.sgmv_expand(torch.randn(3, 4), torch.randn(2, 16, 4), torch.tensor([0, 3]), torch.tensor([0]),
                              torch.empty(3, 16), 1)


# ---------------------------------------------------------------- Triton (interpreted on CPU)


@pytest.mark.parametrize("pop", POPULARITY)
@pytest.mark.parametrize("rank", RANKS)
def test_triton_interpreted(interp, rank, pop):
    check_case(interp, pop, RANKS[rank], LENGTHS["mixed"], seed=7)


@pytest.mark.parametrize("pop", POPULARITY)
def test_triton_interpreted_decode(interp, pop):
    check_case(interp, pop, RANKS["mixed"], LENGTHS["decode"], seed=9)


def test_triton_interpreted_ungrouped_wide(interp):
    # IN and N above one tile (BLOCK_K=64, BLOCK_N=128), rank not a power of two (R=24)
    check_case(interp, "uniform", (24,), LENGTHS["mixed"], n_in=160, n_out=150, grouped=False, seed=8)


def test_triton_interpreted_split_k(interp):
    """IN over three shrink splits, the last one partial (1100 = 2 * 512 + 76)."""
    assert interp.SPLIT_K_CHUNK == 512
    check_case(interp, "zipf", RANKS["mixed"], LENGTHS["mixed"], n_in=1100, seed=10, shrink_tol=1e-4)


def test_triton_interpreted_fused_slices(interp):
    fused_expand_case(interp)


def test_triton_interpreted_edge_cases(interp):
    edge_cases(interp)


# ---------------------------------------------------------------- Triton compiled (CUDA)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_triton_cuda_bf16():
    from loraplex.lora.ops import triton_ops

    lengths = [1] * 40 + [300, 77, 129, 16, 5]
    for i, (pop, ranks) in enumerate([("distinct", (16,)), ("uniform", (8, 16, 64)), ("zipf", (3 * 16,)),
                                      ("identical", (64,))]):
        check_case(triton_ops, pop, ranks, lengths, n_in=1024, n_out=1536, dtype=torch.bfloat16,
                   seed=100 + i, device="cuda", shrink_tol=1e-4, expand_tol=2e-2)
    fused_expand_case(triton_ops, device="cuda", dtype=torch.bfloat16, tol=2e-2, seed=200)
