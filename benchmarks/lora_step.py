"""What LoRA adds to one model step, in context: a real step's forward with and without its adapters.

End-to-end runs (lora_overhead.py, serving.py) compare runs seconds or minutes apart, and this
shared machine's speed drifts by 10-20 % over that time. Here the comparison is per forward: a
generation of --requests requests (adapters by popularity case; 16 rank-8 adapters on all seven
projections, as in lora_overhead.py; float32, CPU) runs once while the model inputs of one step
are kept: the first decode step with every request running, and the first prefill-only step.
That forward then runs --iters times with the step's LoRA batch and as many times without,
alternately (which goes first alternates), ~0.1 s apart. Per case and step kind: the median
forward time of each, and the median over iterations of base-only time / LoRA time. The forward
is the model alone (no sampling, no scheduling), on a worker thread as in the server.

    python benchmarks/lora_step.py [--cases distinct,uniform,zipf,identical] [--requests 32] [--iters 30]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from common import CASES, assignment, make_peft_adapters, prompts_for, save_results

STEP_KINDS = ("decode", "prefill")


def capture_steps(llm, prompts, loras) -> dict[str, tuple]:
    """Generate once, keeping (model inputs, LoRA batch) of the first full decode step and of the
    first prefill-only step."""
    from loraplex import SamplingParams

    runner, kept = llm.engine.runner, {}

    def keep(_module, inputs):
        batch = inputs[2]
        kind = "prefill" if batch.prefills and not batch.num_decode else "decode" if batch.num_decode == len(prompts) else None
        if kind and kind not in kept:
            kept[kind] = (inputs, runner.lora_runtime.batch)

    hook = runner.model.register_forward_pre_hook(keep)
    try:
        llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), lora=loras)
    finally:
        hook.remove()
    return kept


def time_step(runner, inputs: tuple, lora_batch, iters: int) -> dict:
    """Alternate the forward with and without `lora_batch`; returns medians and the median ratio."""
    times = {"lora": [], "base": []}

    def run() -> None:
        for i in range(iters + 2):
            for side in ("lora", "base") if i % 2 == 0 else ("base", "lora"):
                runner.lora_runtime.batch = lora_batch if side == "lora" else None
                start = time.perf_counter()
                runner.model(*inputs)
                if i >= 2:  # the first two rounds warm up
                    times[side].append(time.perf_counter() - start)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    runner.lora_runtime.batch = None
    ratios = [b / l for b, l in zip(times["base"], times["lora"])]
    deciles = statistics.quantiles(ratios, n=10)
    return {
        "lora_ms": 1e3 * statistics.median(times["lora"]), "base_ms": 1e3 * statistics.median(times["base"]),
        "vs_base_only": statistics.median(ratios), "ratio_p10": deciles[0], "ratio_p90": deciles[-1],
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    for k, kind in enumerate(STEP_KINDS):
        mine = [r for r in rows if r["step"] == kind]
        xs = [i + 0.4 * (k - 0.5) for i in range(len(mine))]
        ys = [r["vs_base_only"] for r in mine]
        err = [[y - r["ratio_p10"] for y, r in zip(ys, mine)], [r["ratio_p90"] - y for y, r in zip(ys, mine)]]
        ax.bar(xs, ys, width=0.4, yerr=err, capsize=3, label=f"{kind} step")
        ax.set_xticks(range(len(mine)), [r["case"] for r in mine])
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_ylim(0.5, 1.1)
    ax.set_ylabel("base-only time / LoRA time")
    ax.set_title("one forward with its adapters vs without (median, p10-p90)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args()
    from loraplex import LLM, env
    from loraplex.models.default_model import ensure_default_model

    model_dir = ensure_default_model(env.data_dir())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        _, names, paths = make_peft_adapters(model_dir, Path(tmp) / "adapters")
        llm = LLM(str(model_dir), dtype="float32", device="cpu", max_loras=len(names), max_lora_rank=8)
        for name, path in zip(names, paths):
            llm.add_lora(name, path)
        prompts = prompts_for(llm.tokenizer)[: args.requests]
        print(f"{'case':<10} {'step':<8} {'tokens':>6} {'lora ms':>8} {'base ms':>8} {'base/lora':>9} {'p10-p90':>11}")
        for case in args.cases.split(","):
            loras = [names[i] for i in assignment(case)][: len(prompts)]
            for kind, (inputs, lora_batch) in capture_steps(llm, prompts, loras).items():
                row = {"case": case, "step": kind, "tokens": int(inputs[0].shape[0])}
                row |= time_step(llm.engine.runner, inputs, lora_batch, args.iters)
                print(f"{case:<10} {kind:<8} {row['tokens']:>6} {row['lora_ms']:>8.1f} {row['base_ms']:>8.1f} "
                      f"{row['vs_base_only']:>8.3f}x {row['ratio_p10']:>5.2f}-{row['ratio_p90']:.2f}", flush=True)
                rows.append(row)
    rows.sort(key=lambda r: (STEP_KINDS.index(r["step"]), CASES.index(r["case"])))
    save_results(rows, Path(args.out), "lora_step", plot)


if __name__ == "__main__":
    main()
