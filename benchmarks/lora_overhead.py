"""Multi-LoRA overhead: loraplex with adapters against itself without, and against peft, in one run.

Per model (the default SmolLM2-135M, and a wider random Llama): 16 rank-8 adapters on all seven
projections (made with peft, random weights), 64 requests of 32 output tokens (EOS ignored,
greedy, float32, CPU). Adapter popularity over requests follows Punica's cases: distinct (round
robin), uniform, zipf(1.5), identical. For each case:
- loraplex: one `generate` call, the requests' adapters mixed in every batch (max_loras=16);
- base-only: the same engine and requests, no adapters;
- peft: `generate(..., adapter_names=...)`, peft's mixed-adapter batches, static batches of 16.
Throughput counts output tokens. Ratios are taken inside this one run; loraplex with and without
adapters run alternately, REPEATS times each, and the fastest of each is kept (the machine is
shared and noisy; peft, much slower, runs once).

    python benchmarks/lora_overhead.py [--models default,wide] [--no-peft] [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from common import CASES, assignment, make_peft_adapters, prompts_for, save_results

NUM_ADAPTERS, RANK, NUM_REQUESTS, MAX_TOKENS, PEFT_BATCH, REPEATS = 16, 8, 64, 32, 16, 3


def make_wide_model(default_dir: Path, folder: Path) -> Path:
    """A random Llama wider than SmolLM2 (hidden 1024, MLP 2816, 8 layers), with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
        num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_dir / name, folder / name)
    return folder


def time_loraplex(llm, prompts, loras) -> float:
    from loraplex import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, lora=loras)
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == MAX_TOKENS for o in outs)
    return elapsed


def time_peft(peft_model, pad_id: int, prompts, adapter_names) -> float:
    start = time.perf_counter()
    for i in range(0, len(prompts), PEFT_BATCH):
        batch, names = prompts[i : i + PEFT_BATCH], adapter_names[i : i + PEFT_BATCH]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            out = peft_model.generate(
                input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=MAX_TOKENS,
                min_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=pad_id,
            )
        assert out.shape[1] == width + MAX_TOKENS
    return time.perf_counter() - start


def bench_model(label: str, model_dir: Path, work: Path, with_peft: bool = True) -> list[dict]:
    from loraplex import LLM, SamplingParams

    peft_model, names, paths = make_peft_adapters(model_dir, work / f"{label}-adapters", NUM_ADAPTERS, RANK)
    llm = LLM(str(model_dir), dtype="float32", device="cpu", max_loras=NUM_ADAPTERS, max_lora_rank=RANK)
    for name, path in zip(names, paths):
        llm.add_lora(name, path)
    prompts = prompts_for(llm.tokenizer, NUM_REQUESTS)
    warm = SamplingParams(max_tokens=2, temperature=0.0)
    llm.generate(prompts[:2], warm, lora=[names[0], None])
    pad_id = llm.tokenizer.pad_token_id or 0
    if with_peft:
        time_peft(peft_model, pad_id, prompts[:2], names[:2])
    tokens = NUM_REQUESTS * MAX_TOKENS
    rows = []
    for case in CASES:
        chosen = [names[i] for i in assignment(case, 0, NUM_ADAPTERS, NUM_REQUESTS)]
        lora_s = base_s = float("inf")
        for _ in range(REPEATS):
            lora_s = min(lora_s, time_loraplex(llm, prompts, chosen))
            base_s = min(base_s, time_loraplex(llm, prompts, None))
        peft_tok_s = tokens / time_peft(peft_model, pad_id, prompts, chosen) if with_peft else float("nan")
        row = {
            "model": label, "case": case, "distinct_adapters": len(set(chosen)),
            "loraplex_tok_s": tokens / lora_s, "base_only_tok_s": tokens / base_s, "peft_tok_s": peft_tok_s,
        }
        row["vs_base_only"] = row["loraplex_tok_s"] / row["base_only_tok_s"]
        row["vs_peft"] = row["loraplex_tok_s"] / row["peft_tok_s"]
        print(
            f"{label:<8} {case:<10} {row['distinct_adapters']:>3} {row['loraplex_tok_s']:>9.1f} "
            f"{row['base_only_tok_s']:>9.1f} {row['vs_base_only']:>6.2f}x {row['peft_tok_s']:>8.1f} {row['vs_peft']:>6.2f}x",
            flush=True,
        )
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows}, key=[r["model"] for r in rows].index)
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        x = range(len(mine))
        for k, (key, label) in enumerate(
            [("loraplex_tok_s", "loraplex, 16 LoRAs"), ("base_only_tok_s", "loraplex, base only"), ("peft_tok_s", "peft mixed batches")]
        ):
            ax.bar([i + 0.27 * (k - 1) for i in x], [r[key] for r in mine], width=0.27, label=label)
        ax.set_xticks(list(x), [r["case"] for r in mine])
        ax.set_title(model)
        ax.set_ylabel("output tokens / s")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="default,wide")
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--no-peft", dest="peft", action="store_false", help="loraplex with and without adapters only")
    args = parser.parse_args()
    from loraplex import env
    from loraplex.models.default_model import ensure_default_model

    default_dir = ensure_default_model(env.data_dir())
    print(f"{'model':<8} {'case':<10} {'n':>3} {'lora tok/s':>9} {'base tok/s':>9} {'ratio':>7} {'peft tok/s':>8} {'vs peft':>7}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for label in args.models.split(","):
            model_dir = default_dir if label == "default" else make_wide_model(default_dir, work / "wide")
            rows += bench_model(label, model_dir, work, args.peft)
    save_results(rows, Path(args.out), "lora_overhead", plot)


if __name__ == "__main__":
    main()
