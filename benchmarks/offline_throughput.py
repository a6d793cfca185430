"""Offline throughput: loraplex against transformers `generate` on the default model, in one run.

Workload: 32 chat prompts, output lengths spread over 16–128 tokens (seeded shuffle), EOS ignored,
float32, greedy. loraplex runs all 32 with continuous batching; transformers runs them as one
left-padded batch with `generate` (every row decodes to the longest length, as a padded batch
must). Throughput counts only the tokens each request asked for. Each system runs in its own
subprocess so that its peak RSS is its own; both run in this one invocation, alternately,
`--repeats` times each, and the fastest run of each is kept (the machine is shared and noisy).

    python benchmarks/offline_throughput.py [--requests 32] [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

TOPICS = [
    "the history of Rome", "how photosynthesis works", "why the sky is blue", "a recipe for pancakes",
    "the rules of chess", "how a bicycle stays upright", "the water cycle", "what a CPU cache does",
    "how vaccines work", "the causes of tides", "a short poem about autumn", "how to learn a language",
]


def workload(num_requests: int, seed: int = 0) -> tuple[list[list[dict]], list[int]]:
    rng = random.Random(seed)
    lengths = [16 + round(i * 112 / (num_requests - 1)) for i in range(num_requests)]
    rng.shuffle(lengths)
    chats = [[{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}. (request {i})"}] for i in range(num_requests)]
    return chats, lengths


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_loraplex(model_dir: str, num_requests: int) -> dict:
    from loraplex import LLM, SamplingParams

    llm = LLM(model_dir, dtype="float32", device="cpu")
    chats, lengths = workload(num_requests)
    prompts = [llm.tokenizer.encode_chat(c) for c in chats]
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert [len(o.token_ids) for o in outs] == lengths
    return {"seconds": elapsed, "output_tokens": sum(lengths), "peak_rss_mib": peak_rss_mib()}


def run_transformers(model_dir: str, num_requests: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    chats, lengths = workload(num_requests)
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        model.generate(**tokenizer(texts[:2], return_tensors="pt", padding=True), max_new_tokens=4, do_sample=False)
        start = time.perf_counter()
        out = model.generate(
            **batch, max_new_tokens=max(lengths), min_new_tokens=max(lengths), do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
        elapsed = time.perf_counter() - start
    assert out.shape[1] - batch["input_ids"].shape[1] == max(lengths)
    return {"seconds": elapsed, "output_tokens": sum(lengths), "peak_rss_mib": peak_rss_mib()}


def child(system: str, model_dir: str, num_requests: int) -> dict:
    cmd = [sys.executable, __file__, "--child", system, "--model", model_dir, "--requests", str(num_requests)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    axes[0].bar(names, [results[n]["tokens_per_s"] for n in names], color=["tab:blue", "tab:gray"])
    axes[0].set_ylabel("output tokens / s")
    axes[1].bar(names, [results[n]["peak_rss_mib"] for n in names], color=["tab:blue", "tab:gray"])
    axes[1].set_ylabel("peak RSS (MiB)")
    fig.suptitle("Offline throughput, SmolLM2-135M float32, 32 requests (16–128 tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--model", default=None, help="HF folder (default: the embedded default model)")
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=["loraplex", "transformers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        runner = run_loraplex if args.child == "loraplex" else run_transformers
        print(json.dumps(runner(args.model, args.requests)))
        return
    if args.model is None:
        from loraplex import env
        from loraplex.models.default_model import ensure_default_model

        args.model = str(ensure_default_model(env.data_dir()))
    results = {}
    for _ in range(args.repeats):
        for system in ("loraplex", "transformers"):
            r = child(system, args.model, args.requests)
            r["tokens_per_s"] = r["output_tokens"] / r["seconds"]
            if system not in results or r["seconds"] < results[system]["seconds"]:
                results[system] = r
    ratio = results["loraplex"]["tokens_per_s"] / results["transformers"]["tokens_per_s"]
    print(f"{'system':<13} {'tokens/s':>9} {'seconds':>8} {'peak RSS MiB':>13}")
    for name, r in results.items():
        print(f"{name:<13} {r['tokens_per_s']:>9.1f} {r['seconds']:>8.2f} {r['peak_rss_mib']:>13.0f}")
    print(f"ratio loraplex / transformers: {ratio:.2f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "offline_throughput.json").write_text(json.dumps({"results": results, "ratio": ratio}, indent=2))
    plot(results, out / "offline_throughput.png")
    print(f"wrote {out / 'offline_throughput.json'} and .png")


if __name__ == "__main__":
    main()
