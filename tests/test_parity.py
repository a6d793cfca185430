"""loraplex against transformers on tiny random models of every family (float32, CPU).

The reference: transformers runs the prompt plus loraplex's generated tokens in one forward pass.
Greedy tokens are identical iff every generated token is transformers' argmax at its position;
logprobs must agree to 1e-4.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from loraplex import LLM, SamplingParams
from tiny_models import FAMILIES, VOCAB_SIZE, make_tiny_model

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, logprobs=True, ignore_eos=True)


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf_model = make_tiny_model(request.param, folder)
    return request.param, folder, hf_model


def random_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[256] + [rng.randrange(256) for _ in range(n - 1)] for n in lengths]


def assert_matches_transformers(hf_model, prompt: list[int], out) -> None:
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        logits = hf_model(ids).logits[0, len(prompt) - 1 : -1].float()
    expected_tokens = logits.argmax(-1).tolist()
    assert out.token_ids == expected_tokens
    expected_logprobs = torch.log_softmax(logits, -1)[torch.arange(len(out.token_ids)), ids[0, len(prompt) :]]
    assert torch.allclose(torch.tensor(out.logprobs), expected_logprobs, atol=1e-4, rtol=0)


def make_llm(folder, **kwargs) -> LLM:
    kwargs.setdefault("kv_cache_memory", 4 << 20)
    return LLM(str(folder), dtype="float32", device="cpu", **kwargs)


@pytest.mark.parametrize("backend", ["cpu_inplace", "torch"])
def test_one_prompt_and_mixed_batch(family_model, backend, monkeypatch):
    monkeypatch.setenv("LORAPLEX_ATTENTION", backend)
    _, folder, hf_model = family_model
    llm = make_llm(folder)
    prompts = random_prompts([7, 1, 23, 4, 40, 13])
    single = llm.generate(prompts[:1], GREEDY)[0]
    assert_matches_transformers(hf_model, prompts[0], single)
    outs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        assert out.finish_reason == "length" and len(out.token_ids) == GREEDY.max_tokens
        assert_matches_transformers(hf_model, prompt, out)
    assert outs[0].token_ids == single.token_ids
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_requests_join_while_others_decode(family_model):
    _, folder, hf_model = family_model
    llm = make_llm(folder)
    engine = llm.engine
    prompts = random_prompts([9, 30, 3, 17], seed=1)
    params = [SamplingParams(max_tokens=n, temperature=0.0, logprobs=True, ignore_eos=True) for n in (20, 6, 14, 9)]
    finals = {}
    engine.add_request("a", prompts[0], params[0])
    engine.add_request("b", prompts[1], params[1])
    for step in range(40):
        if step == 3:
            engine.add_request("c", prompts[2], params[2])
        if step == 5:
            assert len(engine.scheduler.running) >= 2  # "d" joins a batch that is decoding
            engine.add_request("d", prompts[3], params[3])
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert sorted(finals) == ["a", "b", "c", "d"] and not engine.has_unfinished()
    for name, prompt, p in zip("abcd", prompts, params):
        assert len(finals[name].token_ids) == p.max_tokens
        assert_matches_transformers(hf_model, prompt, finals[name])
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_preemption_and_chunked_prefill_keep_outputs(family_model):
    _, folder, hf_model = family_model
    # 12 blocks of 4 tokens: the 8 requests below cannot all hold their caches at once
    cfg = json.loads((folder / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    # per block: layers × (K, V) × 4 tokens × KV heads × head_dim × 4 bytes
    args_bytes = cfg["num_hidden_layers"] * 2 * 4 * cfg["num_key_value_heads"] * head_dim * 4
    llm = make_llm(folder, kv_cache_memory=12 * args_bytes, block_size=4, max_num_batched_tokens=16)
    assert llm.engine.block_manager.num_blocks == 12
    prompts = random_prompts([5, 11, 26, 2, 8, 14, 3, 20], seed=2)
    outs = llm.generate(prompts, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0, "the budget was meant to force preemption"
    for prompt, out in zip(prompts, outs):
        assert_matches_transformers(hf_model, prompt, out)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_seeded_sampling_is_reproducible(family_model):
    _, folder, _ = family_model
    llm = make_llm(folder)
    prompts = random_prompts([6, 12, 3], seed=3)
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = llm.generate(prompts[:1], params)[0]
    batched = llm.generate(prompts, [params, SamplingParams(max_tokens=5, temperature=1.0), params])
    assert batched[0].token_ids == alone.token_ids
    assert all(0 <= t < VOCAB_SIZE for t in alone.token_ids)
