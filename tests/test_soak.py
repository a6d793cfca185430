"""A bounded soak on loopback (benchmarks/soak.py, short): steady streaming load with no error,
overload refused cleanly (429 / 3040) and recovered from, nothing lost, every greedy output equal
to the offline LLM's, and the server's resident memory flat across the steady phase."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex import LLM, SamplingParams
from module_loading import load_module
from tiny_models import make_peft_adapter, make_tiny_model

SOAK_PY = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RSS_TOLERANCE = 0.05  # after the warm-up: the last third's median RSS at most 5% over the first third's


soak = load_module(SOAK_PY, "loraplex_bench_soak")


@pytest.fixture(scope="module")
def soak_config(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("soak")
    make_tiny_model("llama", root / "model")
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "model")
    specs = {"wide": dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR),
             "narrow": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])}
    for seed, (name, spec) in enumerate(specs.items()):
        make_peft_adapter(base, root / name, seed=seed, **spec)
    # prompts of one length (bytes = tokens here): the batch shapes seen in the warm-up recur
    prompts = [f"Tenant {i:02d} asks: what is new?" for i in range(4)]
    return soak.SoakConfig(model=str(root / "model"), adapters={name: root / name for name in specs},
                           prompts=prompts, data_dir=root / "data", max_tokens=16, clients=6, max_pending=8,
                           burst=40, kv_cache_memory=4 << 20, warmup_s=4, steady_s=6, overload_s=2, recovery_s=2)


@pytest.fixture(scope="module")
def result(soak_config):
    return soak.run_soak(soak_config)


def test_steady_load_and_recovery_without_errors(result):
    for phase in ("steady", "recovery"):  # (clients <= max_pending: nothing to refuse)
        summary = result["phases"][phase]
        assert summary["ok"] > 0 and summary["errors"] == 0 and summary["refused_429_3040"] == 0, (phase, summary)
    assert result["phases"]["warmup"]["errors"] == 0  # (its bursts may be refused)
    assert result["lost"] == 0 and result["sent"] == sum(p["requests"] for p in result["phases"].values())


def test_overload_is_refused_cleanly(result, soak_config):
    overload = result["phases"]["overload"]
    assert overload["errors"] == 0, overload["error_samples"]
    assert overload["refused_429_3040"] > 0, "the bursts were meant to exceed --max-pending"
    assert overload["ok"] > 0  # up to max_pending of each wave are served


def test_every_output_equals_the_offline_llm(result, soak_config):
    llm = LLM(soak_config.model, dtype="float32", device="cpu", max_loras=2, kv_cache_memory=8 << 20)
    for name, folder in soak_config.adapters.items():
        llm.add_lora(name, folder)
    jobs = soak_config.jobs
    outs = llm.generate([prompt for prompt, _ in jobs], SamplingParams(max_tokens=soak_config.max_tokens,
                                                                       temperature=0.0),
                        lora=[lora for _, lora in jobs])
    assert result["inconsistent_jobs"] == []
    assert len(result["texts"]) == len(jobs)  # every job was served at least once
    for job, text in result["texts"].items():
        assert text == outs[int(job)].text, jobs[int(job)]


def test_nothing_held_afterwards(result):
    gauges = result["gauges_at_end"]
    assert gauges["loraplex_requests_in_flight"] == 0
    assert gauges["loraplex_requests_waiting"] == gauges["loraplex_requests_running"] == 0
    assert gauges["loraplex_kv_blocks_used"] == 0


def test_resident_memory_flat_after_the_warmup(result):
    rss = result["rss"]
    assert rss["samples"] > 20
    assert rss["steady_growth"] <= RSS_TOLERANCE, rss  # steady load alone
    assert rss["soak_growth"] <= RSS_TOLERANCE, rss  # steady, overload and recovery


def test_freed_kv_blocks_are_reused_before_untouched_ones():
    from types import SimpleNamespace

    from loraplex.kvcache.block_manager import BlockManager

    manager, touched = BlockManager(num_blocks=1000, block_size=16), set()
    for _ in range(100):  # one short request after another: 3 blocks each
        seq = SimpleNamespace(num_computed_tokens=0, block_table=[])
        manager.allocate(seq, 40)
        touched.update(seq.block_table)
        manager.free(seq)
    assert len(touched) == 3  # the working set, not 300 blocks' worth of fresh pages
