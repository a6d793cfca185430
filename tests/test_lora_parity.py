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
from tiny_models import FAMILIES, make_tiny_model

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "attn-r2": dict(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "all-r4": dict(r=4, lora_alpha=8, target_modules=ALL_TARGETS),
    "qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True),
}
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, logprobs=True, ignore_eos=True)


@pytest.fixture(scope="module", params=FAMILIES)
def peft_family(request, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    folder = tmp_path_factory.mktemp(request.param)
    hf_model = make_tiny_model(request.param, folder / "base")
    peft_model = None
    for name, kwargs in ADAPTERS.items():
        config = LoraConfig(**kwargs)
        if peft_model is None:
            peft_model = get_peft_model(hf_model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_" in pname:  # peft zero-inits B; make every adapter matter
                p.normal_(0.0, 0.3)
    paths = {}
    for name in ADAPTERS:
        peft_model.save_pretrained(folder / "adapters", selected_adapters=[name])
        paths[name] = next((folder / "adapters").rglob(f"{name}/adapter_config.json")).parent
    peft_model.eval()
    return folder / "base", peft_model, paths


def reference_logits(peft_model, ids: torch.Tensor, adapter: str | None) -> torch.Tensor:
    with torch.no_grad():
        if adapter is None:
            with peft_model.disable_adapter():
                return peft_model(ids).logits[0].float()
        peft_model.set_adapter(adapter)
        return peft_model(ids).logits[0].float()


def assert_matches_peft(peft_model, prompt, adapter, out) -> None:
    ids = torch.tensor([prompt + out.token_ids])
    logits = reference_logits(peft_model, ids, adapter)[len(prompt) - 1 : -1]
    assert out.token_ids == logits.argmax(-1).tolist(), f"adapter {adapter}"
    expected = torch.log_softmax(logits, -1)[torch.arange(len(out.token_ids)), ids[0, len(prompt) :]]
    assert torch.allclose(torch.tensor(out.logprobs), expected, atol=1e-4, rtol=0), f"adapter {adapter}"


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
