"""Mixed-adapter batches against peft running each adapter alone, for every family (float32).

Three adapters made with peft on a tiny random model: rank 2 on attention only, rank 4 on all
seven projections, rank 8 on q/v only; base-only rows share the batch. The reference is peft's
model with that one adapter active (or disabled for base rows), run over the prompt plus
loraplex's tokens: every greedy token must be its argmax and logprobs agree to 1e-4.
"""

from __future__ import annotations

import random

import pytest
import torch

from loraplex import LLM, SamplingParams
from peft_fixtures import assert_matches_peft, make_peft_family
from tiny_models import FAMILIES

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "attn-r2": dict(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "all-r4": dict(r=4, lora_alpha=8, target_modules=ALL_TARGETS),
    "qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True),
}
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, logprobs=True, ignore_eos=True)


@pytest.fixture(scope="module", params=FAMILIES)
def peft_family(request, tmp_path_factory):
    return make_peft_family(request.param, tmp_path_factory.mktemp(request.param), ADAPTERS)


def run_mixed(llm: LLM, peft_model, seed: int):
    rng = random.Random(seed)
    plan = [None, "attn-r2", "all-r4", "qv-r8", None, "all-r4", "qv-r8", "attn-r2", "attn-r2"]
    prompts = [[256] + [rng.randrange(256) for _ in range(rng.randrange(2, 30))] for _ in plan]
    slots_per_step = []
    make_batch = llm.engine.runner._lora_batch

    def recording(ordered):
        slots_per_step.append({e.seq.lora_slot for e in ordered if e.seq.lora_slot >= 0})
        return make_batch(ordered)

    llm.engine.runner._lora_batch = recording
    outs = llm.generate(prompts, GREEDY, lora=plan)
    llm.engine.runner._lora_batch = make_batch
    for prompt, adapter, out in zip(prompts, plan, outs):
        assert_matches_peft(peft_model, prompt, adapter, out)
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks
    return slots_per_step


def llm_with_adapters(peft_family, max_loras: int) -> LLM:
    base, _, paths = peft_family
    llm = LLM(str(base), dtype="float32", device="cpu", kv_cache_memory=4 << 20, max_loras=max_loras)
    for name, path in paths.items():
        llm.add_lora(name, path)
    return llm


def test_mixed_batch_matches_peft(peft_family):
    slots_per_step = run_mixed(llm_with_adapters(peft_family, max_loras=4), peft_family[1], seed=0)
    assert max(len(s) for s in slots_per_step) == 3  # all three adapters shared one forward pass


def test_more_adapters_than_slots_rotate(peft_family):
    slots_per_step = run_mixed(llm_with_adapters(peft_family, max_loras=2), peft_family[1], seed=1)
    assert max(len(s) for s in slots_per_step) == 2
    assert all(s <= {0, 1} for s in slots_per_step)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attention", ["torch", "triton"])  # triton: decode steps replay CUDA graphs
def test_mixed_batch_matches_peft_on_cuda(peft_family, attention, monkeypatch):
    """The whole engine on CUDA (Triton SGMV, float32 with exact dots) against peft on the CPU,
    with slots rotating (two slots, three adapters)."""
    monkeypatch.setenv("LORAPLEX_ATTENTION", attention)
    base, peft_model, paths = peft_family
    llm = LLM(str(base), dtype="float32", device="cuda", kv_cache_memory=4 << 20, max_loras=2)
    for name, path in paths.items():
        llm.add_lora(name, path)
    assert (llm.engine.runner.decode_graphs is not None) == (attention == "triton")
    slots_per_step = run_mixed(llm, peft_model, seed=2)
    assert max(len(s) for s in slots_per_step) == 2
