"""Scale-out on Ray Serve: 1 vs 2 engine replicas, and adapter-affinity vs round-robin routing,
under one seeded open-loop Poisson load over 64 adapters of zipf(1.5) popularity, with few device
slots and a small host cache per replica.

Per configuration: throughput (requests/s, streamed tokens/s), TTFT p50/p99, adapter loads per
100 requests (host → slot copies; disk → host parses, downloads included), and what the capacity
model of docs/SCALING.md predicts for the slot loads. The ingress runs in this process (today's
app over a RemoteEngine, under uvicorn), the replicas on a local Ray.

The model: the default model's architecture and tokenizer cut to a few layers, random weights
(seconds to make; the routing, not the model, is measured). Compare the configurations within one
run: the machine is shared.

    python benchmarks/scaleout.py                # writes benchmarks/out/scaleout.{json,png}
    python benchmarks/scaleout.py --seed 1       # another workload: benchmarks/out/scaleout-seed1.*
    python benchmarks/scaleout.py --quick        # a short smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one torch thread per replica (Ray workers inherit it)

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from common import free_port, make_adapters, save_results  # noqa: E402
from loraplex.api.app import create_app  # noqa: E402
from loraplex.api.connections import uvicorn_config  # noqa: E402
from loraplex.api.server import ServerOptions  # noqa: E402
from loraplex.config import ScaleoutConfig, engine_config  # noqa: E402
from loraplex.serve.deployment import build_ingress_context, deploy, install, start_ray, undeploy  # noqa: E402

OUT = Path(__file__).parent / "out"
MODEL = "@cf/bench/scaleout"
ZIPF = 1.5
CONFIGS = [("1 replica", 1, "affinity"), ("2 replicas, round robin", 2, "round_robin"),
           ("2 replicas, affinity", 2, "affinity")]


def make_model(folder: Path, layers: int) -> Path:
    """The default model's config with `layers` layers, random weights, and its tokenizer files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraplex import env
    from loraplex.models.default_model import ensure_default_model

    source = ensure_default_model(env.data_dir())
    config = AutoConfig.from_pretrained(source)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    return folder


def workload(num_requests: int, rate: float, num_adapters: int, seed: int) -> list[tuple[float, str, int]]:
    """(send at, prompt, adapter index) per request: Poisson arrivals, zipf adapters."""
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** ZIPF for k in range(num_adapters)]
    t, jobs = 0.0, []
    for i in range(num_requests):
        t += rng.expovariate(rate)
        jobs.append((t, f"Tell me about item {i} of the list, briefly.", rng.choices(range(num_adapters), weights)[0]))
    return jobs


def predicted_slot_loads(jobs, num_adapters: int, capacity: int, copies: int) -> float:
    """Capacity model (docs/SCALING.md): slot loads per 100 requests when the `capacity` most
    popular adapters stay in slots (each loaded once into `copies` replicas when first asked
    for) and every request for another adapter loads it."""
    weights = [1 / (k + 1) ** ZIPF for k in range(num_adapters)]  # index k is the k-th most popular
    miss = 1 - sum(weights[:capacity]) / sum(weights)
    first_touches = copies * len({k for _, _, k in jobs if k < capacity})
    return 100 * miss + 100 * first_touches / len(jobs)


class Ingress:
    """The scale-out server in this process: replicas on Ray, today's app under uvicorn."""

    def __init__(self, options: ServerOptions, scaleout: ScaleoutConfig):
        self.scaleout = scaleout
        self.ctx = build_ingress_context(options, scaleout, deploy(options, scaleout))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn_config(install(create_app(self.ctx), self.ctx), options.http,
                                                    "127.0.0.1", port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        while len([r for r in self.ctx.engine.replicas().values() if "engine" in r]) < scaleout.replicas:
            time.sleep(0.1)

    def counters(self) -> dict[str, float]:
        """Adapter loads so far, summed over the replicas (their latest routing stats)."""
        time.sleep(4 * self.scaleout.routing_stats_period_s)
        stats, cache = self.ctx.engine.stats(), self.ctx.engine.cache_stats()
        return {"slot_loads": stats.slot_loads, "host_loads": cache.get("loads", 0)}

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        undeploy(self.scaleout, stop_ray=False)


def upload_all(url: str, account: tuple[str, str], adapters_dir: Path, names: list[str]) -> None:
    account_id, token = account
    with httpx.Client(base_url=f"{url}/client/v4/accounts/{account_id}/ai", timeout=60,
                      headers={"Authorization": f"Bearer {token}"}) as client:
        for name in names:
            finetune = client.post("/finetunes", json={"model": MODEL, "name": name}).raise_for_status().json()
            for file_name in ("adapter_config.json", "adapter_model.safetensors"):
                with open(adapters_dir / name / file_name, "rb") as f:
                    client.post(f"/finetunes/{finetune['result']['id']}/finetune-assets", data={"file_name": file_name},
                                files={"file": (file_name, f)}).raise_for_status()


async def one_request(client: httpx.AsyncClient, path: str, delay: float, prompt: str, lora: str, max_tokens: int) -> dict:
    await asyncio.sleep(delay)
    start = time.perf_counter()
    ttft, tokens = None, 0
    body = {"prompt": prompt, "lora": lora, "max_tokens": max_tokens, "temperature": 0, "stream": True, "raw": True}
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code}
        replica = r.headers.get("x-loraplex-replica")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return {"ok": False, "status": 200}
            if event.get("response"):
                tokens += 1
                if ttft is None:
                    ttft = time.perf_counter() - start
    return {"ok": True, "ttft": ttft, "tokens": tokens, "replica": replica}


async def run_load(url: str, account: tuple[str, str], jobs, names: list[str], max_tokens: int) -> tuple[list[dict], float]:
    account_id, token = account
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits,
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        path = f"/client/v4/accounts/{account_id}/ai/run/{MODEL}"
        start = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, path, at, prompt, names[k], max_tokens)
                                         for at, prompt, k in jobs))
        return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    labels = [r["config"] for r in rows]
    for ax, key, title in zip(axes, ("ttft_p99_s", "slot_loads_per_100", "throughput_rps"),
                              ("TTFT p99 (s)", "slot loads / 100 requests", "throughput (req/s)")):
        ax.bar(range(len(rows)), [r[key] for r in rows], color=["#999", "#d62", "#26b"][:len(rows)])
        ax.set_xticks(range(len(rows)), labels, rotation=12, fontsize=8)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def benchmark(args, work: Path) -> list[dict]:
    model_dir = make_model(work / "model", args.layers)
    adapters_dir = work / "adapters"
    names = make_adapters(model_dir, adapters_dir, args.adapters, rank=8)
    adapter_bytes = (adapters_dir / names[0] / "adapter_model.safetensors").stat().st_size
    settings = dict(dtype="float32", device="cpu", max_loras=args.slots, kv_cache_memory=64 << 20,
                    adapter_host_cache_bytes=int(args.host_adapters * adapter_bytes * 1.05))
    options = ServerOptions(data_dir=work / "data", engine=engine_config(str(model_dir), **settings), model_name=MODEL)
    jobs = workload(args.requests, args.rate, args.adapters, args.seed)
    start_ray(None, num_cpus=2)
    rows, account = [], None
    for i, (label, replicas, router) in enumerate(CONFIGS):
        # an app of its own per configuration: a process keeps the router class it first built for an app
        scaleout = ScaleoutConfig(replicas=replicas, router=router, replica_num_cpus=0.5, routing_stats_period_s=0.25,
                                  app_name=f"scaleout-bench-{i}")
        ingress = Ingress(options, scaleout)
        try:
            if account is None:
                account = ingress.ctx.registry.create_account("bench")
                upload_all(ingress.url, account, adapters_dir, names)
            before = ingress.counters()
            results, elapsed = asyncio.run(run_load(ingress.url, account, jobs, names, args.max_tokens))
            after = ingress.counters()
        finally:
            ingress.stop()
        done = [r for r in results if r["ok"]]
        ttfts = [r["ttft"] for r in done if r["ttft"] is not None]
        n = len(jobs)
        rows.append({
            "config": label, "replicas": replicas, "router": router, "requests": n, "failed": n - len(done),
            "throughput_rps": round(len(done) / elapsed, 3),
            "tokens_per_s": round(sum(r["tokens"] for r in done) / elapsed, 2),
            "ttft_p50_s": round(percentile(ttfts, 50), 4), "ttft_p99_s": round(percentile(ttfts, 99), 4),
            "slot_loads_per_100": round(100 * (after["slot_loads"] - before["slot_loads"]) / n, 2),
            "host_loads_per_100": round(100 * (after["host_loads"] - before["host_loads"]) / n, 2),
            "predicted_slot_loads_per_100": round(predicted_slot_loads(
                jobs, args.adapters, args.slots * (replicas if router == "affinity" else 1),
                copies=1 if router == "affinity" else replicas), 2),
            "replicas_used": len({r["replica"] for r in done}),
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| configuration | req/s | tokens/s | TTFT p50 | TTFT p99 | slot loads /100 req (model) "
            "| host loads /100 req | failed |\n|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['config']} | {r['throughput_rps']} | {r['tokens_per_s']} | {r['ttft_p50_s']} s | {r['ttft_p99_s']} s "
        f"| {r['slot_loads_per_100']} ({r['predicted_slot_loads_per_100']}) | {r['host_loads_per_100']} | {r['failed']} |\n"
        for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rate", type=float, default=8.0, help="requests per second (Poisson)")
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--slots", type=int, default=4, help="device slots per replica")
    parser.add_argument("--host-adapters", type=float, default=8, help="host cache per replica, in adapters")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a short smoke run (not for RESULTS.md)")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.adapters = 40, 16
    with tempfile.TemporaryDirectory(prefix="loraplex-scaleout-") as tmp:
        rows = benchmark(args, Path(tmp))
    meta = {k: v for k, v in vars(args).items()}
    name = "scaleout" + (f"-seed{args.seed}" if args.seed else "") + ("-quick" if args.quick else "")
    save_results([{**row, "settings": meta} for row in rows], OUT, name, plot)
    print(table(rows))


if __name__ == "__main__":
    sys.exit(main())
