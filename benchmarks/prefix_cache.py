"""Prefix caching on a chat workload: a long system prompt shared by every request of 8 adapters.

64 requests (request i uses adapter i % 8; rank-8 random adapters on q/v of the default model,
SmolLM2-135M-Instruct, float32, CPU), each = the same SYSTEM_TOKENS-token system prompt + a
short user turn of its own (16–32 tokens), MAX_TOKENS greedy output tokens (EOS ignored).
Closed loop: CONCURRENCY requests in flight, the next submitted when one finishes. TTFT is
submission → first token; throughput counts output tokens over the whole run. The same engine
settings run with the prefix cache on and off, alternately, ROUNDS times each (the machine is
shared and noisy), in one process; the figures kept per mode are the medians over rounds.
Every output of the "on" runs must equal the "off" runs' (greedy): checked, not assumed.

    python benchmarks/prefix_cache.py [--rounds 1] [--out benchmarks/out]     # ~5 min a round on a quiet 2-core machine
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from common import make_adapters

from loraplex import LLM, SamplingParams
from loraplex.env import data_dir
from loraplex.models.default_model import ensure_default_model

ADAPTERS, REQUESTS, SYSTEM_TOKENS, MAX_TOKENS, CONCURRENCY = 8, 64, 1024, 16, 4


def workload(vocab: int, seed: int = 0) -> list[tuple[list[int], str]]:
    """(prompt tokens, adapter) per request: one system prompt, a user turn each."""
    rng = random.Random(seed)
    system = [rng.randrange(100, vocab) for _ in range(SYSTEM_TOKENS)]
    return [(system + [rng.randrange(100, vocab) for _ in range(rng.randrange(16, 33))], f"adapter-{i % ADAPTERS:02d}")
            for i in range(REQUESTS)]


def run(llm: LLM, requests: list[tuple[list[int], str]], tag: str) -> dict:
    """Closed loop over `requests` with CONCURRENCY in flight; per-request TTFT and outputs."""
    engine, params = llm.engine, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    engine.block_manager.clear_prefix_cache()  # every round starts cold
    hits_before = engine.stats().prefix_hit_tokens
    pending, submitted, first, outputs = list(enumerate(requests)), {}, {}, {}
    start = time.perf_counter()
    while pending or engine.has_unfinished():
        while pending and len(submitted) - len(outputs) < CONCURRENCY:
            i, (prompt, adapter) = pending.pop(0)
            submitted[i] = time.perf_counter()
            engine.add_request(f"{tag}-{i}", prompt, params, adapter)
        for out in engine.step():
            i = int(out.request_id.rsplit("-", 1)[1])
            first.setdefault(i, time.perf_counter())
            if out.finished:
                outputs[i] = out.token_ids
    seconds = time.perf_counter() - start
    ttft = sorted(first[i] - submitted[i] for i in submitted)
    return {"seconds": seconds, "output_tok_s": REQUESTS * MAX_TOKENS / seconds,
            "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))],
            "prefix_hit_tokens": engine.stats().prefix_hit_tokens - hits_before,
            "outputs": [outputs[i] for i in range(len(requests))]}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    modes = list(results)
    for ax, (key, label) in zip(axes, [("ttft", "TTFT (s)"), ("output_tok_s", "output tokens/s")]):
        if key == "ttft":
            for offset, q in ((-0.2, "p50"), (0.2, "p99")):
                ax.bar([i + offset for i in range(len(modes))], [results[m][f"ttft_{q}_s"] for m in modes], 0.4, label=q)
            ax.legend()
        else:
            ax.bar(range(len(modes)), [results[m][key] for m in modes], 0.5)
        ax.set_xticks(range(len(modes)), [f"prefix cache {m}" for m in modes])
        ax.set_ylabel(label)
    fig.suptitle(f"{REQUESTS} requests, {ADAPTERS} adapters, {SYSTEM_TOKENS}-token shared system prompt")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args()
    model_dir = ensure_default_model(data_dir())
    with tempfile.TemporaryDirectory() as tmp:  # the adapters' folders are their disk tier: kept to the end
        names = make_adapters(model_dir, Path(tmp), ADAPTERS, rank=8, targets=["q_proj", "v_proj"])
        engines = {}
        for mode in ("off", "on"):
            llm = LLM(str(model_dir), dtype="float32", max_loras=ADAPTERS, kv_cache_memory=1 << 30,
                      max_num_batched_tokens=1024, prefix_caching=mode == "on")
            for name in names:
                llm.add_lora(name, Path(tmp) / name)
            engines[mode] = llm
        requests = workload(engines["on"].engine.model_args.vocab_size)
        rounds: dict[str, list[dict]] = {"off": [], "on": []}
        for r in range(args.rounds):
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                result = run(engines[mode], requests, f"{mode}{r}")
                rounds[mode].append(result)
                print(f"round {r} prefix cache {mode:>3}: {result['seconds']:.1f} s, TTFT p50 {result['ttft_p50_s']:.2f} s "
                      f"p99 {result['ttft_p99_s']:.2f} s, {result['output_tok_s']:.1f} tok/s, "
                      f"{result['prefix_hit_tokens']} prompt tokens from the cache", flush=True)
    reference = rounds["off"][0]["outputs"]
    assert all(result["outputs"] == reference for results in rounds.values() for result in results), \
        "greedy outputs differ between prefix cache on and off"
    keys = ("seconds", "output_tok_s", "ttft_p50_s", "ttft_p99_s", "prefix_hit_tokens")
    summary = {mode: {k: statistics.median(res[k] for res in results) for k in keys} for mode, results in rounds.items()}
    ratios = {"ttft_p50_off_over_on": summary["off"]["ttft_p50_s"] / summary["on"]["ttft_p50_s"],
              "ttft_p99_off_over_on": summary["off"]["ttft_p99_s"] / summary["on"]["ttft_p99_s"],
              "throughput_on_over_off": summary["on"]["output_tok_s"] / summary["off"]["output_tok_s"]}
    print(f"{'mode':<5}{'TTFT p50 s':>12}{'TTFT p99 s':>12}{'tok/s':>9}{'cached tokens':>15}")
    for mode, s in summary.items():
        print(f"{mode:<5}{s['ttft_p50_s']:>12.2f}{s['ttft_p99_s']:>12.2f}{s['output_tok_s']:>9.1f}{s['prefix_hit_tokens']:>15.0f}")
    print(f"TTFT p50 {ratios['ttft_p50_off_over_on']:.1f}x lower with the cache (goal >= 3x), p99 "
          f"{ratios['ttft_p99_off_over_on']:.1f}x; throughput on/off {ratios['throughput_on_over_off']:.2f}x (goal >= 1)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": "cpu", "model": "SmolLM2-135M-Instruct (default)", "adapters": ADAPTERS, "requests": REQUESTS,
            "system_tokens": SYSTEM_TOKENS, "max_tokens": MAX_TOKENS, "concurrency": CONCURRENCY, "rounds": args.rounds}
    rounds_out = {mode: [{k: res[k] for k in keys} for res in results] for mode, results in rounds.items()}
    (out / "prefix_cache.json").write_text(json.dumps({"meta": meta, "summary": summary, "ratios": ratios,
                                                       "rounds": rounds_out}, indent=2))
    plot(summary, out / "prefix_cache.png")
    print(f"wrote {out / 'prefix_cache.json'} and .png")


if __name__ == "__main__":
    main()
