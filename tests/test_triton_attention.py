"""Triton paged-attention decode against the float64 torch reference (`attention._decode_torch`).

On CPU the kernels run under Triton's interpreter: a private copy of `triton_attention` loaded with
TRITON_INTERPRET=1 (as tests/test_lora_ops.py does), so the process-wide module is unaffected.
Cases: batch 1..9, context lengths crossing block and tile boundaries (1, bs-1, bs, bs+1, several
blocks, uneven), GQA group 1/2/4, head_dim 32/64, sliding window on/off, one or several context
splits (empty splits included), block sizes 1/5/16/32, shuffled block tables, strided q and out.
Every cache row the kernel must not read (unreferenced blocks, rows past a context's end, rows
before its window, the blocks that table padding points at) holds NaN: one read of them would
poison the output. Outputs start as NaN, so every element must be written.

Tolerance for float32: 1e-5 absolute and relative (observed ~4e-7). The compiled kernel runs in
bf16 and float16 in the `cuda`-marked test, against float64 on the same rounded inputs.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from module_loading import load_interpreted
from loraplex.kvcache import attention
from loraplex.kvcache.attention import AttentionBatch, PrefillSegment, decode_backend, paged_attention

HAS_CUDA = torch.cuda.is_available()
NUM_KV_HEADS = 2


@pytest.fixture(scope="module")
def interp():
    pytest.importorskip("triton")
    mod = load_interpreted(Path(attention.__file__).with_name("triton_attention.py"), "loraplex.kvcache._triton_attention_interpreted")
    assert type(mod._decode_kernel).__name__ == "InterpretedFunction"
    return mod


# ---------------------------------------------------------------- cases and the reference


def make_case(lens, group, head_dim, window, block_size, *, dtype=torch.float32, device="cpu", seed=None):
    """Paged caches for sequences of `lens` tokens, blocks scattered at random.

    Returns dict(q, k, v, tables, lens, k_clean, v_clean): k/v hold random values only in the rows
    attention must read and NaN everywhere else; k_clean/v_clean are the same with NaN → 0 (for
    the reference, which reads masked rows too). q and out are strided views of wider tensors.
    `seed=None` draws fresh random inputs.
    """
    if seed is None:
        seed = torch.seed()
        print(f"make_case seed {seed}")  # shown by pytest when the test fails
    gen = torch.Generator().manual_seed(seed)
    batch, num_heads = len(lens), group * NUM_KV_HEADS
    blocks_per_seq = [math.ceil(n / block_size) for n in lens]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks stay unreferenced (NaN); the last one is padding's
    padding_block = num_blocks - 1
    order = torch.randperm(num_blocks - 1, generator=gen).tolist()
    tables = torch.full((batch, max(blocks_per_seq) + 1), padding_block, dtype=torch.int32)
    shape = (num_blocks, block_size, NUM_KV_HEADS, head_dim)
    k, v = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
    for b, n in enumerate(lens):
        own = [order.pop() for _ in range(blocks_per_seq[b])]
        tables[b, : len(own)] = torch.tensor(own, dtype=torch.int32)
        first = max(0, n - window) if window else 0
        for t in range(first, n):
            k[own[t // block_size], t % block_size] = torch.randn(NUM_KV_HEADS, head_dim, generator=gen)
            v[own[t // block_size], t % block_size] = torch.randn(NUM_KV_HEADS, head_dim, generator=gen)
    q_wide = torch.randn(batch, num_heads + 3, head_dim, generator=gen)
    case = dict(
        q_wide=q_wide, k=k, v=v, tables=tables, lens=torch.tensor(lens, dtype=torch.int32),
        k_clean=torch.nan_to_num(k, nan=0.0), v_clean=torch.nan_to_num(v, nan=0.0),
    )
    case = {name: (t.to(dtype) if t.is_floating_point() else t).to(device) for name, t in case.items()}
    case["q"] = case.pop("q_wide")[:, 1 : 1 + num_heads]  # strided, as q split from fused q/k/v is
    return case


def reference(case, scale, window, softcap=None) -> torch.Tensor:
    """The torch decode backend in float64 on the (rounded) inputs, NaN rows zeroed."""
    q = case["q"]
    batch = AttentionBatch(slot_mapping=None, block_size=case["k"].shape[1], num_decode=q.shape[0],
                           block_tables=case["tables"], context_lens=case["lens"])
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    attention._decode_torch(q.double(), case["k_clean"].double(), case["v_clean"].double(), batch, scale, window, out,
                           softcap)
    return out


def run_kernel(mod, case, scale, window, **kwargs) -> torch.Tensor:
    """paged_decode into a NaN-filled strided `out`; checks the columns beside it stay untouched."""
    q = case["q"]
    out_wide = torch.full((*q.shape[:2], q.shape[2] + 8), float("nan"), dtype=q.dtype, device=q.device)
    out = out_wide[..., : q.shape[2]]
    mod.paged_decode(q, case["k"], case["v"], case["tables"], case["lens"], scale, window, out, **kwargs)
    assert out_wide[..., q.shape[2] :].isnan().all()
    assert not out.isnan().any(), "an output element was not written, or a NaN row was read"
    return out


def check(mod, lens, group, head_dim, window, block_size, *, tol=1e-5, seed=0, softcap=None, **kwargs):
    case = make_case(lens, group, head_dim, window, block_size, seed=seed)
    scale = head_dim**-0.5
    out = run_kernel(mod, case, scale, window, softcap=softcap, **kwargs)
    torch.testing.assert_close(out.double(), reference(case, scale, window, softcap), atol=tol, rtol=tol)


def boundary_lens(block_size: int) -> list[int]:
    """1, bs-1, bs, bs+1, several blocks, uneven: one row each."""
    return [1, block_size - 1, block_size, block_size + 1, 3 * block_size + 5, 7 * block_size + 3]


# ---------------------------------------------------------------- interpreted on CPU


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_boundaries_gqa_window_splits(interp, group, head_dim, window, num_splits):
    # tiles of 16 tokens: contexts of up to 115 tokens cross several tiles and, split in 3, give
    # empty splits for the short rows
    check(interp, boundary_lens(16), group, head_dim, window, 16, num_splits=num_splits, tile_tokens=16,
          seed=group * 100 + head_dim + (window or 0) + num_splits)


@pytest.mark.parametrize(("lens", "block_size"), [
    ([37], 16),  # batch 1
    ([40, 3, 17], 1),  # one token per block
    ([23, 1, 11, 5, 30], 5),  # a block size that is not a power of two
    ([200, 64, 33, 1, 96, 65, 129, 7, 150], 32),  # batch 9, default tiles (64 tokens)
])
def test_batch_and_block_sizes(interp, lens, block_size):
    check(interp, lens, 4, 64, None, block_size, seed=len(lens) + block_size)
    check(interp, lens, 2, 32, 19, block_size, seed=len(lens) + block_size + 1)


def test_many_splits_of_a_long_context(interp):
    # one 300-token row cut in 8 (38 tokens each, rounded to whole 16-token tiles) beside rows too
    # short to fill more than the first split
    check(interp, [300, 2, 16], 2, 32, None, 16, num_splits=8, tile_tokens=16, seed=3)
    check(interp, [300, 2, 16], 2, 32, 100, 16, num_splits=8, tile_tokens=16, seed=4)
    check(interp, [130, 9], 2, 40, None, 16, num_splits=2, seed=5)  # head_dim not a power of two


@pytest.mark.parametrize("softcap", [0.5, 3.0, 50.0])  # 0.5, 3.0: the cap bends most scores; 50: Gemma 2's
@pytest.mark.parametrize("window", [None, 8])
def test_softcap(interp, window, softcap):
    """Gemma 2's attention-logit soft-cap, with and without a sliding window, one and three splits."""
    for splits in (1, 3):
        check(interp, boundary_lens(16), 2, 32, window, 16, num_splits=splits, tile_tokens=16, softcap=softcap,
              seed=splits + int(softcap * 10) + (window or 0))


@pytest.mark.parametrize("softcap", [None, 0.5, 50.0])
@pytest.mark.parametrize("window", [None, 8, 24])
def test_cpu_kernel_window_and_softcap(window, softcap):
    """The numba "cpu_inplace" kernel against the float64 reference (GQA group 2, uneven blocks)."""
    from loraplex.kvcache.cpu_kernels import paged_decode

    case = make_case(boundary_lens(16) + [50, 3], 2, 32, window, 16, seed=7 + (window or 0))
    scale = 32**-0.5
    out = torch.full(case["q"].shape, float("nan"))
    paged_decode(case["q"].contiguous().numpy(), case["k"].numpy(), case["v"].numpy(), case["tables"].numpy(),
                 case["lens"].numpy(), scale, int(window or 0), out.numpy(), float(softcap or 0.0))
    torch.testing.assert_close(out.double(), reference(case, scale, window, softcap), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_backend_inside_paged_attention(interp, monkeypatch, softcap):
    """The registered "triton" backend, run by paged_attention on a mixed step (3 decode rows,
    one prefill chunk), writes the same cache and output as the torch backend."""
    from loraplex.kvcache import triton_attention

    monkeypatch.setattr(triton_attention, "paged_decode", interp.paged_decode)
    gen = torch.Generator().manual_seed(5)
    block_size, head_dim, group, num_blocks = 8, 32, 2, 24
    shape = (num_blocks, block_size, NUM_KV_HEADS, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    tables = torch.randperm(num_blocks, generator=gen)[:20].view(4, 5).int()
    lens = [9, 33, 17]  # decode rows: history + the new token
    new_positions = torch.tensor(lens)[:, None] - 1
    decode_slots = attention.block_slots(tables[:3], new_positions, block_size)[:, 0]
    prefill_positions = torch.arange(12)  # row 3's whole prompt, as one chunk
    context = attention.block_slots(tables[3].long(), prefill_positions, block_size)
    slot_mapping = torch.cat([decode_slots, context])
    num_tokens = len(lens) + 12
    q = torch.randn(num_tokens, group * NUM_KV_HEADS, head_dim, generator=gen)
    k = torch.randn(num_tokens, NUM_KV_HEADS, head_dim, generator=gen)
    v = torch.randn(num_tokens, NUM_KV_HEADS, head_dim, generator=gen)
    results = {}
    for backend in ("triton", "cpu_inplace", "torch"):
        batch = AttentionBatch(slot_mapping=slot_mapping, block_size=block_size, decode_backend=backend,
                               num_decode=3, block_tables=tables[:3].contiguous(),
                               context_lens=torch.tensor(lens, dtype=torch.int32),
                               prefills=[PrefillSegment(3, 12, context)])
        cache = (k_cache.clone(), v_cache.clone())
        results[backend] = (paged_attention(q, k, v, cache, batch, head_dim**-0.5, 6, softcap), cache)
    ref, (kr, vr) = results["torch"]
    for backend in ("triton", "cpu_inplace"):
        out, (kc, vc) = results[backend]
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(kc, kr) and torch.equal(vc, vr)
    # the prefill rows (shared by every backend) against attention written out by hand, float64
    keys, values = k_cache.double().view(-1, NUM_KV_HEADS, head_dim), v_cache.double().view(-1, NUM_KV_HEADS, head_dim)
    keys[slot_mapping], values[slot_mapping] = k.double(), v.double()
    keys, values = keys[context].repeat_interleave(group, 1), values[context].repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q[3:].double(), keys) * head_dim**-0.5
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    pos = torch.arange(12)
    visible = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - 6)
    expected = torch.einsum("hqk,khd->qhd", scores.masked_fill(~visible, float("-inf")).softmax(-1), values)
    torch.testing.assert_close(ref[3:].double(), expected, atol=1e-5, rtol=1e-5)


def test_choose_num_splits():
    from loraplex.kvcache.triton_attention import MAX_SPLITS, MIN_TOKENS_PER_SPLIT, choose_num_splits

    assert choose_num_splits(batch=128, num_kv_heads=8, max_context=8192, num_sms=132) == 1  # SMs already busy
    assert choose_num_splits(batch=1, num_kv_heads=8, max_context=MIN_TOKENS_PER_SPLIT, num_sms=132) == 1  # short
    assert choose_num_splits(batch=1, num_kv_heads=8, max_context=1 << 20, num_sms=132) == MAX_SPLITS
    for batch, context in [(4, 4096), (2, 1000), (16, 20000)]:
        splits = choose_num_splits(batch=batch, num_kv_heads=8, max_context=context, num_sms=132)
        most = math.ceil(context / MIN_TOKENS_PER_SPLIT)
        assert 1 < splits <= most
        assert batch * 8 * splits >= 132 or 2 * splits > most  # every SM busy, unless splits got too short
        assert splits & (splits - 1) == 0  # a power of two: few compiled variants


def test_input_errors(interp):
    case = make_case([5, 9], 2, 32, None, 4, seed=1)
    q, k, v, tables, lens = case["q"], case["k"], case["v"], case["tables"], case["lens"]
    out = torch.empty_like(q)
    with pytest.raises(TypeError):
        interp.paged_decode(q, k, v, tables.long(), lens, 1.0, None, out)
    with pytest.raises(TypeError):
        interp.paged_decode(q, k.double(), v, tables, lens, 1.0, None, out)
    with pytest.raises(ValueError):
        interp.paged_decode(q[:, :3], k, v, tables, lens, 1.0, None, out[:, :3])  # 3 heads over 2 KV heads
    with pytest.raises(ValueError):
        interp.paged_decode(q, k, v, tables[:1], lens, 1.0, None, out)


def test_decode_backend_choice(monkeypatch):
    monkeypatch.delenv("LORAPLEX_ATTENTION", raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert decode_backend(torch.float32, cpu) == "cpu_inplace"
    assert decode_backend(torch.bfloat16, cpu) == "torch"
    assert decode_backend(torch.bfloat16, cuda) == "triton"  # the CUDA default (triton is installed here)
    assert decode_backend(torch.float16, cuda) == "triton"
    monkeypatch.setenv("LORAPLEX_ATTENTION", "torch")
    assert decode_backend(torch.bfloat16, cuda) == "torch"
    monkeypatch.setenv("LORAPLEX_ATTENTION", "triton")
    assert decode_backend(torch.float32, cpu) == "triton"
    monkeypatch.setenv("LORAPLEX_ATTENTION", "flash")
    with pytest.raises(ValueError):
        decode_backend(torch.float32, cpu)


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_compiles_for_hopper():
    """Ahead-of-time compilation for sm_90 (ptxas included), no GPU needed: the compiled-only
    paths (tl.dot shapes and dtypes, layouts, shared memory) build in bf16 with and without
    splits and soft-capping, and the merge kernel builds."""
    pytest.importorskip("triton")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from loraplex.kvcache import triton_attention

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton has no bundled ptxas")
    pointers = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*bf16", "tables_ptr": "*i32",
                "lens_ptr": "*i32", "part_acc_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32",
                "qk_scale": "fp32"}

    def compile_for_sm90(fn, constexprs):
        signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32") for name in fn.arg_names}
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        return triton.compile(source, target=GPUTarget("cuda", 90, 32))

    for splits, softcap in ((1, 0.0), (4, 0.0), (1, 50.0)):
        kernel = compile_for_sm90(triton_attention._decode_kernel, dict(
            BLOCK_G=16, BLOCK_D=128, TILE_N=64, NUM_SPLITS=splits, PRECISION="tf32", SOFTCAP=softcap))
        assert kernel.asm["cubin"] and kernel.metadata.shared <= 100 * 1024
    merge = compile_for_sm90(triton_attention._merge_splits_kernel, dict(NUM_SPLITS=4, BLOCK_S=4, BLOCK_D=128))
    assert merge.asm["cubin"]


# ---------------------------------------------------------------- compiled (CUDA)


# half an ulp of the output's rounding (|out| < 4: bf16 2**-7, fp16 2**-10) plus p rounded to tf32
# (relative 2**-11) summed over the context
CUDA_TOLERANCE = {torch.bfloat16: 1.6e-2, torch.float16: 3e-3}


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_half_precision(dtype):
    from loraplex.kvcache import triton_attention

    tol = CUDA_TOLERANCE[dtype]
    mistral = dict(group=4, head_dim=128, block_size=16)  # 32 query heads over 8 KV heads at full size
    uneven = [1, 15, 16, 17, 100, 511, 1000, 2049, 4000, 33, 64, 3]
    for window, splits in [(None, None), (None, 1), (None, 7), (512, None), (4096, 5)]:
        case = make_case(uneven, dtype=dtype, device="cuda", window=window, **mistral)  # fresh random inputs
        scale = 128**-0.5
        out = run_kernel(triton_attention, case, scale, window, num_splits=splits)
        torch.testing.assert_close(out.double(), reference(case, scale, window), atol=tol, rtol=tol)
    for lens, group, head_dim, block_size in [([300] * 64, 1, 64, 32), ([5, 4097], 8, 256, 16), ([77], 2, 96, 16)]:
        case = make_case(lens, group, head_dim, None, block_size, dtype=dtype, device="cuda")
        out = run_kernel(triton_attention, case, head_dim**-0.5, None)
        torch.testing.assert_close(out.double(), reference(case, head_dim**-0.5, None), atol=tol, rtol=tol)
    # Gemma 2 9B-shaped: head_dim 256, 2 query heads per KV head, sliding window 4096, soft-cap 50 (and a tight one)
    for window, softcap, splits in [(4096, 50.0, None), (None, 50.0, 3), (4096, 1.0, 1)]:
        case = make_case([5, 4097, 600, 8000], 2, 256, window, 16, dtype=dtype, device="cuda")
        out = run_kernel(triton_attention, case, 256**-0.5, window, softcap=softcap, num_splits=splits)
        torch.testing.assert_close(out.double(), reference(case, 256**-0.5, window, softcap), atol=tol, rtol=tol)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_compiled_kernel_replays_in_a_cuda_graph():
    """No host sync inside: the decode call captures into a CUDA graph, and a replay after the
    inputs change in place (new query, longer contexts) gives the new answer."""
    from loraplex.kvcache import triton_attention

    lens = [40, 700, 3000, 1]
    case = make_case([n + 16 for n in lens], 4, 128, None, 16, dtype=torch.bfloat16, device="cuda", seed=9)
    q, out = case["q"], torch.empty(case["q"].shape, dtype=torch.bfloat16, device="cuda")
    context_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    args = (q, case["k_clean"], case["v_clean"], case["tables"], context_lens, 128**-0.5, None, out)
    triton_attention.paged_decode(*args)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_attention.paged_decode(*args)
    q.copy_(torch.randn_like(q))
    context_lens.add_(16)
    graph.replay()
    torch.cuda.synchronize()
    case["q"] = q
    torch.testing.assert_close(out.double(), reference(case, 128**-0.5, None), atol=1.6e-2, rtol=1.6e-2)
