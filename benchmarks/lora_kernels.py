"""SGMV shrink/expand kernels on Mistral-7B-shaped layers: time per call, achieved bandwidth.

Shapes: the seven projections of Mistral-7B (hidden 4096, MLP 14336, GQA k/v 1024). Shrink
(x [T, IN] @ A[slot].T → [T, R]) depends only on IN and expand (y[:, :N] += h @ B[slot].T) only on
N, so the seven projections give two shrink shapes and three expand shapes; each row names the
projections it stands for. Grid: T tokens (1–256) split evenly into n segments of n distinct
adapters (1–64, n <= T), ranks 8/16/64; weights in bfloat16 on CUDA.

Per call: the kernel's time, the bytes it must touch at least (the n adapters' weights + the
activations read and written) over that time, as a fraction of the measured device-to-device copy
bandwidth (a 1 GiB `dst.copy_(src)` timed the same way, read + write counted; goal >= 70 %), and
the speed-up over the torch reference (`torch_ops`: one GEMM per segment).

Timing on CUDA: CUDA events around each call, after warm-up, with the L2 cache flushed (a 256 MiB
buffer zeroed) before every call, so that weights come from HBM as they would in a model's
forward pass; the median of the repeats is kept. On CPU (`--quick`: shapes / 8, fewer cases,
float32) the numba kernels (`cpu_ops`, the CPU default) are timed against the same torch
reference with perf_counter, as a smoke check of this script: CPU figures say nothing about GPUs.
Each case's kernel output is checked against the reference once.

    python benchmarks/lora_kernels.py            # CUDA: full grid (~1-2 min on an H100/H200)
    python benchmarks/lora_kernels.py --quick    # CPU smoke check (a few seconds; CPU always runs --quick)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

HIDDEN, MLP, KV = 4096, 14336, 1024
SHRINK_SHAPES = {HIDDEN: "q,k,v,o,gate,up", MLP: "down"}  # IN → projections
EXPAND_SHAPES = {HIDDEN: "q,o,down", KV: "k,v", MLP: "gate,up"}  # N → projections


@dataclass(frozen=True)
class Case:
    op: str  # "shrink" | "expand"
    projections: str
    features: int  # IN for shrink, N for expand
    tokens: int
    adapters: int
    rank: int


@dataclass(frozen=True)
class Settings:
    device: torch.device
    dtype: torch.dtype
    tokens: tuple[int, ...]
    adapters: tuple[int, ...]
    ranks: tuple[int, ...]
    scale: int  # shapes are divided by this (1 on CUDA, 8 with --quick)
    repeats: int


def full_settings(device: torch.device) -> Settings:
    return Settings(device, torch.bfloat16, (1, 8, 32, 128, 256), (1, 8, 32, 64), (8, 16, 64), 1, 50)


def quick_settings(device: torch.device) -> Settings:
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    return Settings(device, dtype, (1, 16, 64), (1, 4, 16), (8, 16), 8, 10)


def cases(s: Settings) -> list[Case]:
    out = []
    for op, shapes in (("shrink", SHRINK_SHAPES), ("expand", EXPAND_SHAPES)):
        for features, projections in shapes.items():
            for rank in s.ranks:
                for tokens in s.tokens:
                    for adapters in s.adapters:
                        if adapters <= tokens:
                            out.append(Case(op, projections, features // s.scale, tokens, adapters, rank))
    return out


# -- timing ---------------------------------------------------------------------------------------


class Timer:
    """Median seconds per call of fn(), after 3 warm-up calls, with the caches flushed (a buffer
    larger than the last-level cache zeroed) before each call: CUDA events, or perf_counter on CPU."""

    def __init__(self, device: torch.device, repeats: int):
        self.device, self.repeats = device, repeats
        if device.type == "cuda":
            self.flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)
        else:  # numpy, one thread: torch's OpenMP workers would keep spinning and starve numba's
            self.flush = np.empty(64 << 20, dtype=np.uint8)

    def __call__(self, fn) -> float:
        for _ in range(3):
            fn()
        if self.device.type != "cuda":
            samples = []
            for _ in range(self.repeats):
                self.flush.fill(0)
                start = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - start)
            return statistics.median(samples)
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(self.repeats)]
        for start, end in pairs:
            self.flush.zero_()  # queued ahead of the call: it also hides the launch's host overhead
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(self.device)
        return statistics.median(start.elapsed_time(end) for start, end in pairs) / 1e3


def copy_bandwidth(timer: Timer, num_bytes: int) -> float:
    """Bytes per second of `dst.copy_(src)` on the device, read + write counted."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=timer.device).random_(0, 255)
    dst = torch.empty_like(src)
    return 2 * num_bytes / timer(lambda: dst.copy_(src))


# -- one case -------------------------------------------------------------------------------------


def segments(tokens: int, adapters: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`adapters` segments of (almost) equal length covering `tokens`, slots 0..adapters-1."""
    bounds = [round(i * tokens / adapters) for i in range(adapters + 1)]
    starts = torch.tensor(bounds, dtype=torch.int32, device=device)
    return starts, torch.arange(adapters, dtype=torch.int32, device=device)


def bytes_touched(case: Case, dtype: torch.dtype) -> int:
    """The least a call must read and write: the adapters' weights, its inputs and outputs."""
    elem, t, r, f, n = dtype.itemsize, case.tokens, case.rank, case.features, case.adapters
    if case.op == "shrink":  # x [T, IN] read, A [n, R, IN] read, out [T, R] float32 written
        return t * f * elem + n * r * f * elem + t * r * 4
    return t * r * 4 + n * f * r * elem + 2 * t * f * elem  # h read, B read, y read and written


def make_call(ops, case: Case, s: Settings, gen: torch.Generator):
    """(call, output) for `ops` on fresh random inputs of `case` (same seed → same inputs)."""
    dev, dtype, t, r, f = s.device, s.dtype, case.tokens, case.rank, case.features
    starts, slots = segments(t, case.adapters, dev)
    rand = lambda *shape: torch.randn(*shape, generator=gen, device=dev) * 0.1  # noqa: E731
    if case.op == "shrink":
        x, a = rand(t, f).to(dtype), rand(case.adapters, r, f).to(dtype)
        out = torch.zeros(t, r, device=dev)
        return (lambda: ops.sgmv_shrink(x, a, starts, slots, out)), out
    h, b = rand(t, r), rand(case.adapters, f, r).to(dtype)
    y = torch.zeros(t, f, dtype=dtype, device=dev)
    return (lambda: ops.sgmv_expand(h, b, starts, slots, y, 0)), y


def check_once(kernel_ops, reference_ops, case: Case, s: Settings) -> None:
    results = []
    for ops in (kernel_ops, reference_ops):
        call, out = make_call(ops, case, s, torch.Generator(s.device).manual_seed(0))
        call()
        results.append(out.float())
    tol = 1e-4 if s.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(results[0], results[1], atol=tol, rtol=tol)


def measure(case: Case, s: Settings, timer: Timer, kernel_ops, reference_ops, copy_bps: float) -> dict:
    check_once(kernel_ops, reference_ops, case, s)
    kernel_s = timer(make_call(kernel_ops, case, s, torch.Generator(s.device).manual_seed(1))[0])
    reference_s = timer(make_call(reference_ops, case, s, torch.Generator(s.device).manual_seed(1))[0])
    bps = bytes_touched(case, s.dtype) / kernel_s
    return {**asdict(case), "bytes": bytes_touched(case, s.dtype), "kernel_us": kernel_s * 1e6,
            "reference_us": reference_s * 1e6, "gb_s": bps / 1e9, "fraction_of_copy": bps / copy_bps,
            "speedup_vs_reference": reference_s / kernel_s}


# -- report ---------------------------------------------------------------------------------------


def summary(rows: list[dict]) -> list[dict]:
    """Per (op, projections, rank): the smallest and the largest case, median / best bandwidth fraction."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["op"], row["projections"], row["features"], row["rank"]), []).append(row)
    out = []
    for (op, projections, features, rank), mine in groups.items():
        smallest = min(mine, key=lambda r: (r["tokens"], r["adapters"]))
        largest = max(mine, key=lambda r: (r["tokens"], r["adapters"]))
        fractions = [r["fraction_of_copy"] for r in mine]
        out.append({"op": op, "projections": projections, "features": features, "rank": rank,
                    "smallest_us": smallest["kernel_us"], "largest_us": largest["kernel_us"],
                    "largest_case": f"T={largest['tokens']} n={largest['adapters']}",
                    "median_fraction": statistics.median(fractions), "best_fraction": max(fractions),
                    "median_speedup": statistics.median(r["speedup_vs_reference"] for r in mine)})
    return out


def print_table(lines: list[dict], kernel_name: str, copy_bps: float) -> None:
    print(f"copy bandwidth {copy_bps / 1e9:.1f} GB/s; {kernel_name} vs torch reference")
    print(f"{'op':<7}{'projections':<17}{'r':>3}{'T=1,n=1 us':>12}{'largest us':>12}{'case':>13}"
          f"{'%copy med':>10}{'%copy best':>11}{'vs torch':>9}")
    for x in lines:
        print(f"{x['op']:<7}{x['projections']:<17}{x['rank']:>3}{x['smallest_us']:>12.1f}{x['largest_us']:>12.1f}"
              f"{x['largest_case']:>13}{100 * x['median_fraction']:>9.0f}%{100 * x['best_fraction']:>10.0f}%"
              f"{x['median_speedup']:>8.1f}x")


def plot(rows: list[dict], path: Path, kernel_name: str) -> None:
    """Per op: fraction of copy bandwidth against tokens, one line per (projections, rank), most adapters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, op in zip(axes, ("shrink", "expand")):
        lines: dict[tuple, dict[int, dict]] = {}
        for row in rows:
            if row["op"] == op:
                best = lines.setdefault((row["projections"], row["rank"]), {})
                if row["tokens"] not in best or row["adapters"] > best[row["tokens"]]["adapters"]:
                    best[row["tokens"]] = row
        for (projections, rank), points in sorted(lines.items()):
            tokens = sorted(points)
            ax.plot(tokens, [100 * points[t]["fraction_of_copy"] for t in tokens], marker="o",
                    label=f"{projections} r{rank}")
        ax.axhline(70, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens (n = min(T, most adapters))")
        ax.set_title(f"{kernel_name} sgmv_{op}")
        ax.legend(fontsize=7, ncol=2)
    axes[0].set_ylabel("% of device copy bandwidth")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="shapes / 8, few cases (the CPU smoke check)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args()
    from loraplex.lora.ops import cpu_ops, torch_ops

    device = torch.device(args.device)
    if device.type == "cuda":
        from loraplex.lora.ops import triton_ops as kernel_ops

        kernel_name = "triton"
    else:
        kernel_ops, kernel_name = cpu_ops, "numba"
    settings = quick_settings(device) if args.quick or device.type == "cpu" else full_settings(device)
    timer = Timer(device, settings.repeats)
    copy_bps = copy_bandwidth(timer, (1 << 30) if device.type == "cuda" else (128 << 20))
    rows = [measure(case, settings, timer, kernel_ops, torch_ops, copy_bps) for case in cases(settings)]
    lines = summary(rows)
    print_table(lines, kernel_name, copy_bps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "lora_kernels_quick" if settings.scale > 1 else "lora_kernels"
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "kernel": kernel_name, "dtype": str(settings.dtype),
            "shape_divisor": settings.scale, "copy_gb_s": copy_bps / 1e9, "goal_fraction_of_copy": 0.7}
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "summary": lines, "rows": rows}, indent=2))
    plot(rows, out / f"{name}.png", kernel_name)
    print(f"wrote {out / name}.json and .png")


if __name__ == "__main__":
    main()
