"""End-to-end decode throughput of a Mistral-7B-shaped model: 32 LoRA adapters against base only.

The model is random (nothing can be downloaded): an HF-format folder (config.json, per-layer
safetensors shards + index, a word-level tokenizer.json covering the vocabulary) written into a
temporary folder (under /dev/shm when it has room), bfloat16 on CUDA. Adapters: 32 PEFT folders,
rank 8 on all seven projections, random float16 weights, registered with `LLM.add_lora`.

For each batch size (1, 8, 32, 128): that many requests of PROMPT_LEN random prompt tokens and
MAX_TOKENS output tokens (greedy, EOS ignored), submitted at once through the engine and stepped
here; "lora" gives request i adapter i % 32 (distinct adapters in every batch), "base" gives none.
Decode throughput counts the output tokens produced after every request of the batch has its first
token (prefill done), over the time that took; end-to-end counts all output tokens over the whole
run. Each configuration first runs once untimed (Triton compilation, adapter slot loads); then
lora and base alternate REPEATS times and the fastest of each is kept.

Cold load: `engine.runner.load_lora(slot, adapter)` of one rank-8 adapter already parsed into host
memory (pinned on CUDA), i.e. the host → device copy into a slot, timed with CUDA syncs around it,
after the throughput runs (it overwrites a slot), median of COLD_REPEATS.

    python benchmarks/gpu_decode.py                 # CUDA: Mistral-7B shape, bf16 (~5 min incl. writing 14 GB)
    python benchmarks/gpu_decode.py --layers 8      # a shallower model, to save time
    python benchmarks/gpu_decode.py --tiny          # CPU smoke check: a tiny shape, float32 (seconds)
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
         "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
REPEATS, COLD_REPEATS = 2, 5


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def projection(self, target: str) -> tuple[int, int]:
        """(in_features, out_features) of an HF projection."""
        kv = self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, self.hidden), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (self.hidden, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}[target]


MISTRAL_7B = Shape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=32000)
TINY = Shape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=512)


@dataclass(frozen=True)
class Workload:
    batches: tuple[int, ...]
    prompt_len: int
    max_tokens: int
    adapters: int
    rank: int


# -- model and adapters on disk -------------------------------------------------------------------


def write_config(folder: Path, shape: Shape) -> None:
    config = {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate, "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads, "head_dim": shape.head_dim,
        "vocab_size": shape.vocab, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
        "rope_theta": 1e6, "sliding_window": None, "tie_word_embeddings": False, "hidden_act": "silu",
        "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer with one word per model id ("<unk>", "<s>", "</s>", "w3", …)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, vocab_size)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def random_tensor(shape: tuple[int, ...], std: float, dtype: torch.dtype, device, gen: torch.Generator) -> torch.Tensor:
    """Normal(0, std) values made on `device` (fast on a GPU), returned on the CPU for saving."""
    return (torch.randn(shape, generator=gen, device=device) * std).to(dtype).cpu()


def write_weights(folder: Path, shape: Shape, dtype: torch.dtype, device) -> None:
    """One safetensors shard per layer (plus one for embeddings and head) and the index."""
    from safetensors.torch import save_file

    gen = torch.Generator(device).manual_seed(0)
    weight_map = {}

    def save(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, str(folder / name))
        weight_map.update({key: name for key in tensors})

    save("embed.safetensors", {
        "model.embed_tokens.weight": random_tensor((shape.vocab, shape.hidden), 1.0, dtype, device, gen),
        "lm_head.weight": random_tensor((shape.vocab, shape.hidden), shape.hidden**-0.5, dtype, device, gen),
        "model.norm.weight": torch.ones(shape.hidden, dtype=dtype),
    })
    for layer in range(shape.layers):
        prefix = f"model.layers.{layer}"
        tensors = {f"{prefix}.input_layernorm.weight": torch.ones(shape.hidden, dtype=dtype),
                   f"{prefix}.post_attention_layernorm.weight": torch.ones(shape.hidden, dtype=dtype)}
        for target in TARGETS:
            fan_in, fan_out = shape.projection(target)
            tensors[f"{prefix}.{BLOCK[target]}.{target}.weight"] = random_tensor(
                (fan_out, fan_in), fan_in**-0.5, dtype, device, gen)
        save(f"layer-{layer:03d}.safetensors", tensors)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_model(folder: Path, shape: Shape, dtype: torch.dtype, device) -> Path:
    folder.mkdir(parents=True)
    write_config(folder, shape)
    write_tokenizer(folder, shape.vocab)
    write_weights(folder, shape, dtype, device)
    return folder


def write_adapter(folder: Path, shape: Shape, rank: int, seed: int, device) -> Path:
    """A PEFT LoRA folder: rank `rank` on all seven projections of every layer, float16, random."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    gen = torch.Generator(device).manual_seed(1000 + seed)
    tensors = {}
    for layer in range(shape.layers):
        for target in TARGETS:
            fan_in, fan_out = shape.projection(target)
            prefix = f"base_model.model.model.layers.{layer}.{BLOCK[target]}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = random_tensor((rank, fan_in), fan_in**-0.5, torch.float16, device, gen)
            tensors[f"{prefix}.lora_B.weight"] = random_tensor((fan_out, rank), 0.02, torch.float16, device, gen)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "lora_dropout": 0.0, "bias": "none", "target_modules": TARGETS, "base_model_name_or_path": "random"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def scratch_dir(bytes_needed: int) -> Path:
    """A temporary folder, in /dev/shm (RAM) when it has room for `bytes_needed` (with margin)."""
    shm = Path("/dev/shm")
    parent = shm if shm.is_dir() and shutil.disk_usage(shm).free > 1.2 * bytes_needed else None
    return Path(tempfile.mkdtemp(prefix="loraplex-gpu-decode-", dir=parent))


def model_bytes(shape: Shape, dtype: torch.dtype) -> int:
    per_layer = sum(i * o for i, o in map(shape.projection, TARGETS))
    return (shape.layers * per_layer + 2 * shape.vocab * shape.hidden) * dtype.itemsize


def adapter_bytes(shape: Shape, rank: int) -> int:
    """Size of one float16 adapter file's tensors."""
    return shape.layers * sum(rank * (i + o) for i, o in map(shape.projection, TARGETS)) * 2


# -- measuring ------------------------------------------------------------------------------------


def run_batch(engine, prompts: list[list[int]], max_tokens: int, loras: list[str | None], tag: str) -> dict:
    """Submit every prompt at once, step to the end; decode = after every request's first token."""
    from loraplex import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    start = time.perf_counter()
    for request_id, prompt, lora in zip(ids, prompts, loras):
        engine.add_request(request_id, prompt, params, lora)
    produced: dict[str, int] = {}
    decode_start = decode_start_tokens = None
    while engine.has_unfinished():
        for out in engine.step():
            produced[out.request_id] = len(out.token_ids)
        if decode_start is None and len(produced) == len(prompts) and min(produced.values()) >= 1:
            decode_start, decode_start_tokens = time.perf_counter(), sum(produced.values())
    end = time.perf_counter()
    total = sum(produced.values())
    assert total == len(prompts) * max_tokens, f"expected {len(prompts) * max_tokens} tokens, got {total}"
    decode_tokens = total - decode_start_tokens
    return {"seconds": end - start, "output_tokens": total, "end_to_end_tok_s": total / (end - start),
            "decode_seconds": end - decode_start, "decode_tokens": decode_tokens,
            "decode_tok_s": decode_tokens / (end - decode_start) if decode_tokens else float("nan")}


def measure_batch(engine, batch: int, work: Workload, names: list[str], rng: random.Random, vocab: int) -> dict:
    prompts = [[1] + [rng.randrange(3, vocab) for _ in range(work.prompt_len - 1)] for _ in range(batch)]
    modes = {"lora": [names[i % len(names)] for i in range(batch)], "base": [None] * batch}
    best: dict[str, dict] = {}
    for mode, loras in modes.items():  # untimed: compiles kernels, loads the batch's adapters into slots
        run_batch(engine, prompts, min(4, work.max_tokens), loras, f"warm-{mode}-{batch}")
    for repeat in range(REPEATS):
        for mode, loras in modes.items():
            result = run_batch(engine, prompts, work.max_tokens, loras, f"{mode}-{batch}-{repeat}")
            if mode not in best or result["decode_tok_s"] > best[mode]["decode_tok_s"]:
                best[mode] = result
    row = {"batch": batch, "distinct_adapters": len(set(modes["lora"])), "lora": best["lora"], "base": best["base"]}
    row["decode_lora_vs_base"] = best["lora"]["decode_tok_s"] / best["base"]["decode_tok_s"]
    row["end_to_end_lora_vs_base"] = best["lora"]["end_to_end_tok_s"] / best["base"]["end_to_end_tok_s"]
    return row


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cold_load(engine, adapter) -> dict:
    """Host → slot copy of one parsed adapter (slot 0), CUDA-synchronised, median of COLD_REPEATS."""
    device, samples = engine.device, []
    for _ in range(COLD_REPEATS):
        sync(device)
        start = time.perf_counter()
        engine.runner.load_lora(0, adapter)
        sync(device)
        samples.append(time.perf_counter() - start)
    host_bytes = adapter.size_bytes
    median = statistics.median(samples)
    return {"median_ms": median * 1e3, "min_ms": min(samples) * 1e3, "host_bytes": host_bytes,
            "host_gb_s": host_bytes / median / 1e9}


# -- main -----------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="tiny shape, CPU float32: a smoke check of this script")
    parser.add_argument("--layers", type=int, help="override the number of layers (default 32, tiny 2)")
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--no-cuda-graphs", action="store_true", help="decode steps launched eagerly, to compare")
    parser.add_argument("--out", default="benchmarks/out")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from loraplex import LLM
    from loraplex.adapters.cache import LocalSource

    shape = TINY if args.tiny else MISTRAL_7B
    if args.layers:
        shape = replace(shape, layers=args.layers)
    if args.tiny:
        device, dtype, prompt_len, max_tokens = torch.device("cpu"), torch.float32, 16, 8
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --tiny for the CPU smoke check")
        device, dtype, prompt_len, max_tokens = torch.device("cuda"), torch.bfloat16, args.prompt_len, args.max_tokens
    work = Workload(tuple(int(b) for b in args.batches.split(",")), prompt_len, max_tokens, args.adapters, args.rank)
    folder = scratch_dir(model_bytes(shape, dtype) + work.adapters * adapter_bytes(shape, work.rank))
    try:
        started = time.perf_counter()
        model_dir = write_model(folder / "model", shape, dtype, device)
        adapter_dirs = [write_adapter(folder / f"adapter-{i}", shape, work.rank, i, device) for i in range(work.adapters)]
        written_s = time.perf_counter() - started
        llm = LLM(str(model_dir), dtype=str(dtype).removeprefix("torch."), device=device.type,
                  max_loras=work.adapters, max_lora_rank=work.rank, max_num_seqs=max(work.batches),
                  max_num_batched_tokens=4096, kv_cache_memory=None if device.type == "cuda" else 64 << 20,
                  adapter_host_cache_bytes=4 * work.adapters * adapter_bytes(shape, work.rank) + (64 << 20),  # all stay parsed
                  cuda_graphs=not args.no_cuda_graphs)
        adapters = [llm.engine.register_lora(f"adapter-{i}", LocalSource(path), load_now=True)
                    for i, path in enumerate(adapter_dirs)]
        loaded_s = time.perf_counter() - started - written_s
        print(f"{shape} {dtype} on {device}: wrote in {written_s:.1f} s, loaded in {loaded_s:.1f} s; "
              f"attention backend {llm.engine.runner.decode_backend}, "
              f"CUDA graphs {'on' if llm.engine.runner.decode_graphs else 'off'}")
        print(f"{'batch':>5} {'lora dec tok/s':>14} {'base dec tok/s':>14} {'ratio':>6} {'lora e2e':>9} {'base e2e':>9}")
        rng, rows = random.Random(0), []
        names = [f"adapter-{i}" for i in range(work.adapters)]
        for batch in work.batches:
            row = measure_batch(llm.engine, batch, work, names, rng, shape.vocab)
            rows.append(row)
            print(f"{batch:>5} {row['lora']['decode_tok_s']:>14.1f} {row['base']['decode_tok_s']:>14.1f} "
                  f"{row['decode_lora_vs_base']:>5.2f}x {row['lora']['end_to_end_tok_s']:>9.1f} "
                  f"{row['base']['end_to_end_tok_s']:>9.1f}", flush=True)
        cold = cold_load(llm.engine, adapters[0])
        print(f"cold load of one rank-{work.rank} adapter host → slot: {cold['median_ms']:.2f} ms median "
              f"({cold['host_bytes'] / 1e6:.1f} MB host copy, {cold['host_gb_s']:.1f} GB/s)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(dtype), "shape": asdict(shape), "workload": asdict(work),
            "attention_backend": llm.engine.runner.decode_backend, "repeats": REPEATS,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "write_seconds": written_s, "load_seconds": loaded_s}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "gpu_decode_tiny.json" if args.tiny else "gpu_decode.json"
    (out / name).write_text(json.dumps({"meta": meta, "rows": rows, "cold_load": cold}, indent=2))
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
