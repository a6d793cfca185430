"""Prefix caching keyed by adapter content: the block manager's index, and outputs against peft.

Every output is compared with transformers + peft (greedy tokens, logprobs within 1e-4) while
prompts that share a prefix are asked again: one at a time, in mixed batches, under other
adapters, under none, after an adapter is replaced by other weights under the same name, with
chunked prefill and preemption; and the prefix-cache counters say the cache was really used.
"""

from __future__ import annotations

import random

import pytest

from loraplex import LLM, SamplingParams
from loraplex.engine.sequence import Sequence
from loraplex.kvcache.block_manager import BlockManager
from loraplex.models.hf_config import read_model_args
from peft_fixtures import assert_matches_peft, make_peft_family
from tiny_models import FAMILIES

ADAPTERS = {
    "attn-r2": dict(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mlp-r4": dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    # same targets and rank as attn-r2, other weights: uploaded again under attn-r2's name
    "attn-r2-new": dict(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
}
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, logprobs=True, ignore_eos=True)
BLOCK = 4


def seq(tokens: list[int], salt: bytes = b"") -> Sequence:
    s = Sequence("r", tokens, SamplingParams(max_tokens=4), 0)
    s.cache_salt = salt
    return s


def compute(manager: BlockManager, s: Sequence, n: int) -> None:
    """What a step does for `s`: allocate, compute n tokens, index the blocks they filled."""
    manager.allocate(s, n)
    s.num_computed_tokens += n
    manager.cache_computed_blocks(s, n)


# ---------------------------------------------------------------- the block manager alone


def test_full_blocks_are_shared_by_salt_and_tokens_only():
    manager = BlockManager(16, BLOCK, prefix_caching=True)
    first = seq(list(range(10)), b"adapter-a")
    compute(manager, first, 10)
    assert manager.num_cached_blocks == 2  # tokens 0-7; the partial third block is not indexed
    same = seq(list(range(10)) + [99], b"adapter-a")
    assert manager.match_prefix(same) == first.block_table[:2]
    assert manager.match_prefix(seq(list(range(10)), b"adapter-b")) == []  # another adapter
    assert manager.match_prefix(seq([7] + list(range(1, 10)), b"adapter-a")) == []  # first block differs
    assert manager.match_prefix(seq(list(range(8)), b"adapter-a")) == first.block_table[:1]  # last token left to compute
    manager.take_prefix(same, manager.match_prefix(same))
    assert same.num_computed_tokens == 8 and same.block_table == first.block_table[:2]
    compute(manager, same, 3)
    manager.free(first)
    manager.free(same)
    assert manager.num_free_blocks == 16  # cached blocks with no holder count as free
    assert manager.num_cached_blocks == 2
    assert manager.clear_prefix_cache() == 2 and manager.num_cached_blocks == 0
    assert manager.num_free_blocks == 16


def test_only_computed_blocks_enter_the_index():
    """A sequence preempted or aborted before its tokens were computed leaves nothing behind."""
    manager = BlockManager(16, BLOCK, prefix_caching=True)
    aborted = seq(list(range(12)))
    manager.allocate(aborted, 12)  # scheduled, then aborted before the step ran
    manager.free(aborted)
    assert manager.num_cached_blocks == 0
    chunked = seq(list(range(12)))
    compute(manager, chunked, 6)  # a first prefill chunk: one block full, one half written
    assert manager.num_cached_blocks == 1
    first_block = chunked.block_table[0]
    manager.free(chunked)  # preempted
    assert manager.match_prefix(seq(list(range(12)))) == [first_block]
    assert manager.num_free_blocks == 16


def test_idle_cached_blocks_are_evicted_least_recently_released_first():
    manager = BlockManager(4, BLOCK, prefix_caching=True)
    old, new = seq([1] * 5, b"old"), seq([2] * 5, b"new")
    compute(manager, old, 5)
    compute(manager, new, 5)
    manager.free(old)
    manager.free(new)
    assert manager.num_cached_blocks == 2 and manager.num_free_blocks == 4
    filler = seq([3] * 12)
    compute(manager, filler, 12)  # 3 blocks: 2 never used, then the oldest cached one
    assert manager.prefix_evictions == 1
    assert manager.match_prefix(seq([1] * 5, b"old")) == []
    assert manager.match_prefix(seq([2] * 5, b"new")) != []


def test_taking_idle_cached_blocks_counts_against_free_ones():
    manager = BlockManager(3, BLOCK, prefix_caching=True)
    cached = seq([5] * 9)
    compute(manager, cached, 9)
    manager.free(cached)  # 2 cached blocks idle, 1 free: 3 free in all
    again = seq([5] * 9 + [6] * 4)
    prefix = manager.match_prefix(again)
    assert len(prefix) == 2
    assert manager.can_allocate(again, 4, prefix)  # tokens 8-11: one block, the plain free one
    assert not manager.can_allocate(again, 5, prefix)  # a second one: taken by the prefix itself
    assert manager.can_allocate(again, 5)  # (without the prefix, 2 of 3 free blocks would do)


def test_off_means_no_index():
    manager = BlockManager(8, BLOCK)
    s = seq(list(range(10)))
    compute(manager, s, 10)
    assert manager.num_cached_blocks == 0 and manager.match_prefix(seq(list(range(10)))) == []


# ---------------------------------------------------------------- outputs against peft


@pytest.fixture(scope="module", params=FAMILIES)
def peft_family(request, tmp_path_factory):
    return make_peft_family(request.param, tmp_path_factory.mktemp(request.param), ADAPTERS)


def make_llm(peft_family, **kwargs) -> LLM:
    base, _, paths = peft_family
    kwargs.setdefault("kv_cache_memory", 4 << 20)
    llm = LLM(str(base), dtype="float32", device="cpu", block_size=BLOCK, max_loras=2, **kwargs)
    for name in ("attn-r2", "mlp-r4", "qv-r8"):
        llm.add_lora(name, paths[name])
    return llm


def prompts_with_prefix(prefix_len: int, count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    system = [256] + [rng.randrange(256) for _ in range(prefix_len - 1)]
    return [system + [rng.randrange(256) for _ in range(rng.randrange(1, 9))] for _ in range(count)]


def hits(llm: LLM) -> int:
    return llm.engine.stats().prefix_hit_tokens


def test_prompts_asked_again_match_peft(peft_family):
    _, peft_model, paths = peft_family
    llm = make_llm(peft_family)
    prompts = prompts_with_prefix(22, 10, seed=3)

    def ask(prompt, adapter):
        out = llm.generate([prompt], GREEDY, lora=adapter)[0]
        assert_matches_peft(peft_model, prompt, adapter, out)
        return out

    ask(prompts[0], "attn-r2")
    before = hits(llm)
    ask(prompts[0], "attn-r2")  # the same prompt again: its full blocks come from the cache
    assert hits(llm) - before >= 20
    before = hits(llm)
    ask(prompts[0], "mlp-r4")  # another adapter: nothing of attn-r2's may be reused
    ask(prompts[0], None)  # nor by the base model
    assert hits(llm) == before
    ask(prompts[1], "mlp-r4")  # the shared system prompt, now cached for mlp-r4
    assert hits(llm) - before >= 20

    # a mixed batch: every adapter and the base model, the same system prompt, slots rotating
    plan = [None, "attn-r2", "mlp-r4", "qv-r8", None, "qv-r8", "attn-r2", "mlp-r4", None, "qv-r8"]
    before = hits(llm)
    for prompt, adapter, out in zip(prompts, plan, llm.generate(prompts, GREEDY, lora=plan)):
        assert_matches_peft(peft_model, prompt, adapter, out)
    assert hits(llm) > before

    # attn-r2 deleted and uploaded again with other weights under the same name
    llm.engine.remove_lora("attn-r2")
    llm.add_lora("attn-r2", paths["attn-r2-new"])
    before = hits(llm)
    out = llm.generate([prompts[0]], GREEDY, lora="attn-r2")[0]
    assert_matches_peft(peft_model, prompts[0], "attn-r2-new", out)
    assert hits(llm) == before  # nothing computed with the old weights was reused
    out = llm.generate([prompts[0]], GREEDY, lora="attn-r2")[0]
    assert_matches_peft(peft_model, prompts[0], "attn-r2-new", out)
    assert hits(llm) > before

    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks
    manager.clear_prefix_cache()
    assert manager.num_cached_blocks == 0 and manager.num_free_blocks == manager.num_blocks


def test_chunked_prefill_and_preemption_with_shared_blocks(peft_family):
    """A small KV cache (24 blocks of 4 tokens) and 8-token steps: prompts are prefilled in
    chunks, sequences are preempted, cached blocks are evicted and shared ones stay."""
    base, peft_model, _ = peft_family
    args = read_model_args(base)
    per_block = 2 * args.num_layers * BLOCK * args.num_kv_heads * args.head_dim * 4  # K and V, float32
    llm = make_llm(peft_family, kv_cache_memory=24 * per_block, max_num_batched_tokens=8)
    assert llm.engine.block_manager.num_blocks == 24
    prompts = prompts_with_prefix(13, 12, seed=5)
    plan = [[None, "attn-r2", "qv-r8", "mlp-r4"][i % 4] for i in range(12)]
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=True, ignore_eos=True)
    for prompt, adapter, out in zip(prompts, plan, llm.generate(prompts, params, lora=plan)):
        assert_matches_peft(peft_model, prompt, adapter, out)
    stats = llm.engine.stats()
    assert stats.preemptions > 0 and stats.prefix_hit_tokens > 0 and stats.prefix_evictions > 0
    assert stats.kv_blocks_free == stats.kv_blocks_total


def test_turned_off_computes_everything(peft_family):
    _, peft_model, _ = peft_family
    llm = make_llm(peft_family, prefix_caching=False)
    prompts = prompts_with_prefix(22, 2, seed=4)
    for _ in range(2):
        for prompt, out in zip(prompts, llm.generate(prompts, GREEDY, lora="qv-r8")):
            assert_matches_peft(peft_model, prompt, "qv-r8", out)
    assert hits(llm) == 0 and llm.engine.block_manager.num_cached_blocks == 0
