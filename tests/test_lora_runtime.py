"""The LoRA runtimes that LoraLinear calls: `CpuLoraRuntime` (numba kernel, arguments prepared
once per linear and per step) against the float64 loop, and against the generic runtime."""

from __future__ import annotations

from types import SimpleNamespace

import numba
import numpy as np
import pytest
import torch

from loraplex.lora.layers import CpuLoraRuntime, LoraBatch, LoraRuntime
from loraplex.lora.ops import cpu_ops
from loraplex.lora.slots import PackedLoraWeights
from lora_cases import LEFT, N_IN, RIGHT, SLICES, make_batch, make_lora_weights, ref_lora

OFFSETS = [LEFT + sum(SLICES[:i]) for i in range(len(SLICES))]
WIDTH = LEFT + sum(SLICES) + RIGHT


def make_runtime(cls, num_slots: int, seed: int = 0, dtype=torch.float32):
    """A runtime over one packed linear "qkv" (slots laid out as LoraSlots keeps them)."""
    a, bs = make_lora_weights(num_slots, torch.Generator().manual_seed(seed), dtype)
    weights = PackedLoraWeights(a, bs, OFFSETS)
    slots = SimpleNamespace(num_slots=num_slots, layers=[{"qkv": weights}])
    runtime = cls(slots, "cpu")
    return runtime, weights, runtime.bind(weights)


@pytest.mark.parametrize("pop", ["distinct", "uniform", "zipf", "identical"])
def test_cpu_runtime_adds_each_tokens_delta(pop):
    rng, gen = np.random.default_rng(1), torch.Generator().manual_seed(1)
    seg_starts, seg_slots, t = make_batch(pop, [1] * 9 + [17, 4], 6, rng)
    x, y0 = torch.randn(t, N_IN, generator=gen), torch.randn(t, WIDTH, generator=gen)
    results = []
    for cls in (CpuLoraRuntime, LoraRuntime):
        runtime, w, bound = make_runtime(cls, 6)
        runtime.batch = LoraBatch(seg_starts, {"qkv": seg_slots})
        y = y0.clone()
        runtime.add_delta("qkv", bound, x, y)
        ref = ref_lora(x, w.a, w.b, OFFSETS, seg_starts, seg_slots, y0)
        torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
        results.append(y)
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-5)


def test_cpu_runtime_skips_linears_and_steps_without_adapters():
    runtime, _, bound = make_runtime(CpuLoraRuntime, 2)
    x, y0 = torch.randn(3, N_IN), torch.randn(3, WIDTH)
    seg_starts, seg_slots = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([1], dtype=torch.int32)
    for batch in (None, LoraBatch(seg_starts, {"o": seg_slots})):  # no adapter; none touching qkv
        runtime.batch = batch
        y = y0.clone()
        runtime.add_delta("qkv", bound, x, y)
        assert torch.equal(y, y0)


def test_cpu_runtime_sees_slot_loads_between_steps():
    """The numpy views are made once, in bind: a slot loaded in place later (as LoraSlots.load
    does between steps) is what the next step uses."""
    runtime, w, bound = make_runtime(CpuLoraRuntime, 2, seed=3)
    gen = torch.Generator().manual_seed(4)
    seg_starts, seg_slots = torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([1, 0], dtype=torch.int32)
    x = torch.randn(5, N_IN, generator=gen)
    for _ in range(2):
        runtime.batch = LoraBatch(seg_starts, {"qkv": seg_slots})
        y0 = torch.randn(5, WIDTH, generator=gen)
        y = y0.clone()
        runtime.add_delta("qkv", bound, x, y)
        torch.testing.assert_close(y.double(), ref_lora(x, w.a, w.b, OFFSETS, seg_starts, seg_slots, y0), atol=1e-5, rtol=1e-5)
        w.a[1].normal_(generator=gen)
        for b in w.b:
            b[1].normal_(generator=gen)


def test_cpu_runtime_refuses_a_bad_step_before_touching_y():
    runtime, _, bound = make_runtime(CpuLoraRuntime, 2)
    with pytest.raises(ValueError, match="slot 2"):
        runtime.batch = LoraBatch(torch.tensor([0, 3], dtype=torch.int32), {"qkv": torch.tensor([2], dtype=torch.int32)})
    runtime.batch = LoraBatch(torch.tensor([0, 3], dtype=torch.int32), {"qkv": torch.tensor([1], dtype=torch.int32)})
    y = torch.zeros(2, WIDTH)
    with pytest.raises(ValueError, match="3 tokens, not 2"):
        runtime.add_delta("qkv", bound, torch.randn(2, N_IN), y)
    assert (y == 0).all()


def test_cpu_runtime_is_for_float32_slots_only():
    runtime, _, _ = make_runtime(LoraRuntime, 2, dtype=torch.bfloat16)
    assert not CpuLoraRuntime.supports(runtime.slots)
    assert CpuLoraRuntime.supports(make_runtime(LoraRuntime, 2)[0].slots)


def test_cpu_runtime_compiles_its_kernels_when_made():
    """No request waits for numba: making the runtime compiles both drivers for its linears' types.
    Four slices: a count no model linear has, so no other test compiled these types before."""
    slices, rank, num_slots = (8, 8, 8, 8), 4, 2
    a = torch.randn(num_slots, len(slices) * rank, N_IN)
    bs = [torch.randn(num_slots, rank, n).transpose(1, 2) for n in slices]
    offsets = [sum(slices[:i]) for i in range(len(slices))]
    weights = PackedLoraWeights(a, bs, offsets)
    bound = cpu_ops.kernel_weights(a, bs, offsets)
    x, y = np.zeros((1, N_IN), dtype=np.float32), np.zeros((1, sum(slices)), dtype=np.float32)
    types = tuple(numba.typeof(v) for v in (x, bound.a, bound.b_t, bound.offsets, np.zeros(1, dtype=np.int64), y))
    assert types not in cpu_ops._shrink_expand_parallel.signatures
    CpuLoraRuntime(SimpleNamespace(num_slots=num_slots, layers=[{"qkv": weights}]), "cpu")
    assert types in cpu_ops._shrink_expand.signatures and types in cpu_ops._shrink_expand_parallel.signatures
