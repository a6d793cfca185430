"""Decode steps through DecodeGraphs' static buffers give the same tokens as the eager path.

On CPU the graphs run with capture=False: the padded static-buffer forward, eagerly (every path
but the CUDA capture itself); the `cuda`-marked test captures real CUDA graphs.
"""

from __future__ import annotations

import pytest
import torch

from loraplex import LLM, SamplingParams
from loraplex.engine.decode_graphs import batch_buckets
from tiny_models import make_peft_adapter, make_tiny_model

HAS_CUDA = torch.cuda.is_available()


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_buckets(30) == [1, 2, 4, 8, 16, 24, 30]


@pytest.fixture(scope="module")
def model_and_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    base = make_tiny_model("llama", root / "base")
    adapters = {
        "qv": make_peft_adapter(base, root / "qv", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "mlp": make_peft_adapter(base, root / "mlp", seed=2, r=8, lora_alpha=8, target_modules=["gate_proj", "down_proj"]),
    }
    return root, list(adapters)


def run(root, names, graphs: str | None, device: str = "cpu") -> tuple[list[list[int]], LLM]:
    """11 requests (adapters mixed with base-only ones, outputs of 3..24 tokens, so the decode
    batch shrinks through every bucket) on a fresh engine; graphs: None, "eager" or "capture"."""
    llm = LLM(str(root / "base"), dtype="float32", device=device, max_loras=2, kv_cache_memory=4 << 20)
    for name in names:
        llm.add_lora(name, root / name)
    # both adapters into their slots first, so that no request waits for a copy below and the
    # batch sizes do not depend on how fast the copy thread runs
    llm.generate([[1, 2]] * len(names), SamplingParams(max_tokens=1), lora=names)
    if graphs is not None:
        llm.engine.runner.enable_decode_graphs(max_batch=12, max_model_len=llm.engine.max_model_len,
                                               capture=graphs == "capture")
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (int(n),), generator=gen).tolist() for n in torch.randint(2, 20, (11,), generator=gen)]
    params = [SamplingParams(max_tokens=3 + 2 * i, temperature=0.0, ignore_eos=True) for i in range(11)]
    loras = [[None, "qv", "mlp"][(i + 2) % 3] for i in range(11)]  # the longest, last alone, is base-only
    return [out.token_ids for out in llm.generate(prompts, params, lora=loras)], llm


def test_static_buffer_decode_matches_eager(model_and_adapters):
    root, names = model_and_adapters
    eager, _ = run(root, names, graphs=None)
    padded, llm = run(root, names, graphs="eager")
    assert padded == eager
    graphs = llm.engine.runner.decode_graphs
    buckets = {bucket for bucket, _ in graphs.made}
    assert {1, 2, 4, 8}.issubset(buckets) and {with_lora for _, with_lora in graphs.made} == {True, False}
    runner, manager = llm.engine.runner, llm.engine.block_manager
    assert manager.num_blocks == runner.num_blocks  # the scratch block is never handed out
    k_cache = runner.model.attention_layers()[0].kv_cache[0]
    assert k_cache.shape[0] == runner.num_blocks + 1


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_graph_decode_matches_eager(model_and_adapters, monkeypatch):
    """Every decode step of a real generation runs both ways on the same inputs: the captured
    graph's hidden states must match the eager forward's. (Not token equality: the graph path
    pads the batch and the block tables, so Triton attention may split the context differently
    and round differently.)"""
    monkeypatch.setenv("LORAPLEX_ATTENTION", "triton")
    root, names = model_and_adapters
    llm = LLM(str(root / "base"), dtype="float32", device="cuda", max_loras=2, max_num_seqs=12, kv_cache_memory=64 << 20)
    for name in names:
        llm.add_lora(name, root / name)
    runner = llm.engine.runner
    assert runner.decode_graphs is not None, "on by default on CUDA with Triton attention"
    graphed, checked = runner._decode_with_graphs, []

    def both_ways(decodes):
        hidden = graphed(decodes).clone()
        torch.testing.assert_close(hidden, runner._forward(decodes, []), rtol=2e-3, atol=2e-3)
        checked.append(len(decodes))
        return hidden

    monkeypatch.setattr(runner, "_decode_with_graphs", both_ways)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (5 + i,), generator=gen).tolist() for i in range(11)]
    params = [SamplingParams(max_tokens=3 + 2 * i, temperature=0.0, ignore_eos=True) for i in range(11)]
    llm.generate(prompts, params, lora=[[None, "qv", "mlp"][(i + 2) % 3] for i in range(11)])
    assert len(set(checked)) >= 5 and {w for _, w in runner.decode_graphs.made} == {True, False}
