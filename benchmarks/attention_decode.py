"""Decode attention over the paged KV cache: in-place kernel against the gathering reference.

Shapes are the default model's (SmolLM2-135M: 9 query heads, 3 KV heads, head_dim 64), float32,
CPU. For each (batch, context) the script times one layer's decode attention for both backends and
measures, with torch's profiler, the bytes that torch allocates during the call: the gathering
reference materialises every row's K/V history; the in-place kernel reads the blocks where they lie.

    python benchmarks/attention_decode.py [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from loraplex.kvcache.attention import _DECODE_BACKENDS, AttentionBatch

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16


def make_case(batch: int, context: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = -(-context // BLOCK)
    num_blocks = batch * blocks_per_seq
    k = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=g)
    v = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=g)
    tables = torch.randperm(num_blocks, generator=g).view(batch, blocks_per_seq).int()
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=g)
    lens = torch.full((batch,), context, dtype=torch.int32)
    return q, k, v, lens, tables


def fresh_batch(lens, tables) -> AttentionBatch:
    return AttentionBatch(slot_mapping=None, block_size=BLOCK, num_decode=len(lens), block_tables=tables, context_lens=lens)


def time_backend(name, q, k, v, lens, tables, repeats: int) -> float:
    fn = _DECODE_BACKENDS[name]
    out = torch.empty_like(q)
    fn(q, k, v, fresh_batch(lens, tables), HEAD_DIM**-0.5, 0, out)  # warm-up (numba load)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(q, k, v, fresh_batch(lens, tables), HEAD_DIM**-0.5, 0, out)
    return (time.perf_counter() - start) / repeats


def allocated_bytes(name, q, k, v, lens, tables) -> int:
    fn = _DECODE_BACKENDS[name]
    out = torch.empty_like(q)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(q, k, v, fresh_batch(lens, tables), HEAD_DIM**-0.5, 0, out)
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    rows = []
    print(f"{'batch':>5} {'context':>7} {'KV bytes':>10} {'inplace ms':>10} {'torch ms':>9} {'speed-up':>8} {'inplace alloc':>13} {'torch alloc':>11}")
    for batch in (8, 32):
        for context in (128, 512, 2048):
            case = make_case(batch, context)
            kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * 4
            row = {"batch": batch, "context": context, "kv_history_bytes": kv_bytes}
            for name in ("cpu_inplace", "torch"):
                row[f"{name}_ms"] = time_backend(name, *case, args.repeats) * 1e3
                row[f"{name}_allocated_bytes"] = allocated_bytes(name, *case)
            rows.append(row)
            print(
                f"{batch:>5} {context:>7} {kv_bytes:>10} {row['cpu_inplace_ms']:>10.2f} {row['torch_ms']:>9.2f}"
                f" {row['torch_ms'] / row['cpu_inplace_ms']:>7.1f}x {row['cpu_inplace_allocated_bytes']:>13}"
                f" {row['torch_allocated_bytes']:>11}"
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_decode.json").write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2))
    print(f"wrote {out / 'attention_decode.json'}")


if __name__ == "__main__":
    main()
