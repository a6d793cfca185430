"""Soak: one loraplex server under steady streaming load, then past its capacity, then steady
again. Nothing may be lost, refusals must be clean, and the server's memory must stay flat.

The server runs in a subprocess on a free loopback port (`loraplex serve … --kv-cache-memory`),
with --adapters random PEFT adapters uploaded through the finetunes API. Closed-loop clients (httpx, asyncio) stream greedy requests
round the fixed job list (prompt × adapter, the base model included):

1. warm-up (--warmup s): bursts as in 3., then --clients clients, so that the server's pools,
   caches and allocators reach their high-water marks; refusals allowed, errors not.
2. steady (--steady s), --clients clients (<= --max-pending): no error allowed. The server's RSS
   (psutil) is sampled every 0.25 s: "flat" compares the median of the last third of the samples
   with the median of the first third, over this phase and over everything after the warm-up.
3. overload (--overload s): waves of --burst simultaneous requests (> --max-pending): each is
   served or refused at once with 429 and code 3040, nothing else.
4. recovery (--recovery s), --clients clients again: no error allowed.

Every request ends in exactly one outcome (ok: 200 with its [DONE]; refused: 429 / 3040; error:
anything else, a transport error or timeout included); "lost" counts requests sent without an
outcome, and errors are what the run must keep at zero. Greedy outputs of one job must all
be the same text (`inconsistent_jobs`). At the end the server's /metrics must show nothing in
flight and every KV block free.

    python benchmarks/soak.py [--model default|HF_FOLDER] [--steady 300] [--clients 6] [--max-pending 8]
        [--burst 40] [--kv-cache-memory BYTES (0: the server's default)] [--out benchmarks/out]

Writes soak.json, soak_rss.csv and soak_rss.png to --out and prints a table. tests/test_soak.py
runs a short version on a tiny random model and also compares every output with the offline LLM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from loraplex.client import stop_process, wait_until_healthy

BENCH_DIR = Path(__file__).resolve().parent
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FILES = ("adapter_config.json", "adapter_model.safetensors")
MODEL_NAME = "soak-model"


@dataclass
class SoakConfig:
    model: str  # an HF folder, or "default"
    adapters: dict[str, Path]  # finetune name → PEFT folder
    prompts: list[str]  # sent raw; keep them one length in tokens, so batch shapes repeat
    data_dir: Path
    max_tokens: int = 24
    clients: int = 6
    max_pending: int = 8
    burst: int = 40
    kv_cache_memory: int | None = 4 << 20  # None: the server's default
    dtype: str = "float32"
    warmup_s: float = 3.0
    steady_s: float = 9.0
    overload_s: float = 3.0
    recovery_s: float = 3.0

    @property
    def jobs(self) -> list[tuple[str, str | None]]:
        """(prompt, finetune name or None): every prompt with every adapter and the base model."""
        return [(prompt, lora) for lora in [None, *self.adapters] for prompt in self.prompts]


@dataclass
class Outcome:
    """What came back for one request: exactly one per request sent."""

    phase: str
    job: int  # index into SoakConfig.jobs
    kind: str  # "ok" | "refused" (429 / 3040) | "error"
    status: int | None = None
    code: int | None = None  # the envelope's error code
    text: str = ""
    completion_tokens: int = 0
    ttft_s: float | None = None
    latency_s: float = 0.0
    detail: str = ""


# --- the server process ------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(config: SoakConfig):
    """Start the server, wait for /healthz; yields (base url, pid); stops it at the end."""
    port = free_port()
    command = [sys.executable, "-m", "loraplex.cli", "serve", "--model", config.model, "--model-name", MODEL_NAME,
               "--data-dir", str(config.data_dir), "--dtype", config.dtype, "--port", str(port),
               "--max-pending", str(config.max_pending), "--log-level", "warning"]
    if config.kv_cache_memory:  # else the server's default budget
        command += ["--kv-cache-memory", str(config.kv_cache_memory)]
    log_path = config.data_dir / "server.log"
    config.data_dir.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=os.environ | {"LORAPLEX_DATA_DIR": str(config.data_dir)})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc, 300, log_path)
        yield url, proc.pid
    finally:
        stop_process(proc, 30)


def create_tenant(data_dir: Path) -> tuple[str, str]:
    """An account in the server's registry, as `loraplex accounts create` makes it."""
    from loraplex.adapters.registry import open_registry

    registry = open_registry(data_dir)
    try:
        return registry.create_account("soak")
    finally:
        registry.close()


def upload_adapters(api: httpx.Client, adapters: dict[str, Path]) -> None:
    for name, folder in adapters.items():
        created = api.post("/finetunes", json={"model": MODEL_NAME, "name": name})
        created.raise_for_status()
        for file_name in FILES:
            response = api.post(f"/finetunes/{created.json()['result']['id']}/finetune-assets",
                                data={"file_name": file_name},
                                files={"file": (file_name, (folder / file_name).read_bytes())})
            response.raise_for_status()


# --- the clients -------------------------------------------------------------------------------

SENT: Counter = Counter()  # requests sent, per phase (compared with the outcomes: "lost")


async def one_request(client: httpx.AsyncClient, config: SoakConfig, phase: str, job: int) -> Outcome:
    """Stream one job; every request sent becomes exactly one Outcome."""
    SENT[phase] += 1
    prompt, lora = config.jobs[job]
    body = {"prompt": prompt, "raw": True, "max_tokens": config.max_tokens, "temperature": 0, "stream": True}
    if lora:
        body["lora"] = lora
    out = Outcome(phase, job, "error")
    start = time.perf_counter()
    try:
        async with client.stream("POST", f"/run/{MODEL_NAME}", json=body) as response:
            out.status = response.status_code
            if response.status_code != 200:
                _read_refusal(out, await response.aread())
            else:
                await _read_stream(out, response, start)
    except (httpx.HTTPError, ValueError, KeyError) as e:
        out.kind, out.detail = "error", f"{type(e).__name__}: {e}"[:300]
    out.latency_s = time.perf_counter() - start
    return out


def _read_refusal(out: Outcome, raw: bytes) -> None:
    envelope = json.loads(raw)
    out.code = envelope["errors"][0]["code"]
    clean = envelope["success"] is False and envelope["result"] is None and envelope["errors"][0]["message"]
    out.kind = "refused" if (out.status, out.code) == (429, 3040) and clean else "error"
    out.detail = raw[:300].decode(errors="replace")


async def _read_stream(out: Outcome, response: httpx.Response, start: float) -> None:
    done = False
    async for line in response.aiter_lines():
        if not line:
            continue
        if line == "data: [DONE]":
            done = True
            continue
        event = json.loads(line.removeprefix("data: "))
        if "error" in event:
            out.code, out.detail = event["error"]["code"], event["error"]["message"][:300]
            return
        if out.ttft_s is None and event["response"]:
            out.ttft_s = time.perf_counter() - start
        out.text += event["response"]
        if "usage" in event:
            out.completion_tokens = event["usage"]["completion_tokens"]
    out.kind = "ok" if done else "error"
    out.detail = "" if done else "the stream ended without [DONE]"


async def closed_loop(client: httpx.AsyncClient, config: SoakConfig, phase: str, seconds: float,
                      outcomes: list[Outcome]) -> None:
    """config.clients clients, each sending its next job as soon as the previous one ended."""
    until = time.monotonic() + seconds

    async def one_client(index: int) -> None:
        job = index
        while time.monotonic() < until:
            outcomes.append(await one_request(client, config, phase, job % len(config.jobs)))
            job += config.clients

    await asyncio.gather(*(one_client(i) for i in range(config.clients)))


async def waves(client: httpx.AsyncClient, config: SoakConfig, phase: str, seconds: float,
                outcomes: list[Outcome]) -> None:
    """Waves of config.burst simultaneous requests, the next as soon as the last one ended (at
    least one wave)."""
    until, wave = time.monotonic() + seconds, 0
    while wave == 0 or time.monotonic() < until:
        jobs = [(wave * config.burst + i) % len(config.jobs) for i in range(config.burst)]
        outcomes += await asyncio.gather(*(one_request(client, config, phase, job) for job in jobs))
        wave += 1


class RssSampler:
    """Samples the server's resident memory every `interval_s`, tagged with the current `phase`."""

    def __init__(self, pid: int, interval_s: float = 0.25):
        import psutil

        self.process, self.interval_s = psutil.Process(pid), interval_s
        self.phase = "warmup"
        self.samples: list[tuple[float, int, str]] = []  # (seconds since start, rss bytes, phase)
        self._start = time.monotonic()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.samples.append((time.monotonic() - self._start, self.process.memory_info().rss, self.phase))
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
            except TimeoutError:
                pass


async def drive(url: str, pid: int, account_id: str, token: str,
                config: SoakConfig) -> tuple[list[Outcome], RssSampler]:
    """The four phases against a running server; every outcome, and the RSS samples."""
    limits = httpx.Limits(max_connections=config.burst + config.clients + 8)
    outcomes: list[Outcome] = []
    sampler, stop = RssSampler(pid), asyncio.Event()
    async with httpx.AsyncClient(base_url=f"{url}/client/v4/accounts/{account_id}/ai", limits=limits, timeout=120,
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        sampling = asyncio.create_task(sampler.run(stop))
        # the warm-up has both kinds of load, so that the server's pools reach their high-water marks
        await waves(client, config, "warmup", config.warmup_s / 2, outcomes)
        for phase, seconds in (("warmup", config.warmup_s / 2), ("steady", config.steady_s),
                               ("overload", config.overload_s), ("recovery", config.recovery_s)):
            sampler.phase = phase
            if phase == "overload":
                await waves(client, config, phase, seconds, outcomes)
            else:
                await closed_loop(client, config, phase, seconds, outcomes)
        stop.set()
        await sampling
    return outcomes, sampler


# --- the report --------------------------------------------------------------------------------

def wait_idle_metrics(url: str, timeout_s: float = 30) -> dict[str, float]:
    """The server's gauges once nothing is in flight (or after timeout_s)."""
    wanted = ("loraplex_requests_in_flight", "loraplex_requests_waiting", "loraplex_requests_running",
              "loraplex_kv_blocks_used", "loraplex_kv_blocks_total")
    deadline = time.monotonic() + timeout_s
    while True:
        gauges = {}
        for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
            name, _, value = line.partition(" ")
            if name in wanted:
                gauges[name] = float(value)
        if gauges.get("loraplex_requests_in_flight") == 0 and gauges.get("loraplex_kv_blocks_used") == 0:
            return gauges
        if time.monotonic() > deadline:
            return gauges
        time.sleep(0.1)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def phase_summary(outcomes: list[Outcome], seconds: float) -> dict:
    kinds = Counter(o.kind for o in outcomes)
    ok = [o for o in outcomes if o.kind == "ok"]
    return {
        "seconds": seconds, "requests": len(outcomes), "ok": kinds["ok"], "refused_429_3040": kinds["refused"],
        "errors": kinds["error"], "ok_per_s": round(len(ok) / seconds, 2) if seconds else None,
        "tokens_per_s": round(sum(o.completion_tokens for o in ok) / seconds, 1) if seconds else None,
        "ttft_p50_s": percentile([o.ttft_s for o in ok if o.ttft_s is not None], 0.5),
        "ttft_p99_s": percentile([o.ttft_s for o in ok if o.ttft_s is not None], 0.99),
        "refusal_latency_p99_s": percentile([o.latency_s for o in outcomes if o.kind == "refused"], 0.99),
        "error_samples": sorted({o.detail for o in outcomes if o.kind == "error"})[:5],
    }


def _thirds_growth(values: list[int]) -> tuple[float, float, float]:
    """(median of the first third, median of the last third, their relative growth)."""
    third = max(1, len(values) // 3)
    first, last = statistics.median(values[:third]), statistics.median(values[-third:])
    return first, last, last / first - 1


def rss_summary(samples: list[tuple[float, int, str]]) -> dict:
    """Flatness (MiB, and the growth of the last third's median over the first third's) over the
    steady phase, and over the whole soak after the warm-up (steady, overload, recovery)."""
    mib = 1 << 20
    steady_first, steady_last, steady_growth = _thirds_growth([rss for _, rss, p in samples if p == "steady"])
    soak_first, soak_last, soak_growth = _thirds_growth([rss for _, rss, p in samples if p != "warmup"])
    return {
        "samples": len(samples), "start_mib": round(samples[0][1] / mib, 1), "end_mib": round(samples[-1][1] / mib, 1),
        "max_mib": round(max(rss for _, rss, _ in samples) / mib, 1),
        "after_warmup_mib": round(next(rss for _, rss, p in samples if p != "warmup") / mib, 1),
        "steady_first_third_median_mib": round(steady_first / mib, 1),
        "steady_last_third_median_mib": round(steady_last / mib, 1), "steady_growth": round(steady_growth, 4),
        "soak_first_third_median_mib": round(soak_first / mib, 1),
        "soak_last_third_median_mib": round(soak_last / mib, 1), "soak_growth": round(soak_growth, 4),
    }


def report(config: SoakConfig, outcomes: list[Outcome], sampler: RssSampler, gauges: dict) -> dict:
    seconds = {"warmup": config.warmup_s, "steady": config.steady_s, "overload": config.overload_s,
               "recovery": config.recovery_s}
    texts: dict[int, set[str]] = defaultdict(set)
    for o in outcomes:
        if o.kind == "ok":
            texts[o.job].add(o.text)
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items() if k != "adapters"}
                  | {"adapters": sorted(config.adapters), "jobs": len(config.jobs)},
        "phases": {phase: phase_summary([o for o in outcomes if o.phase == phase], s) for phase, s in seconds.items()},
        "sent": sum(SENT.values()), "lost": sum(SENT.values()) - len(outcomes),
        "inconsistent_jobs": sorted(job for job, seen in texts.items() if len(seen) > 1),
        "texts": {job: sorted(seen)[0] for job, seen in sorted(texts.items())},
        "rss": rss_summary(sampler.samples),
        "rss_samples": [(round(t, 2), rss, phase) for t, rss, phase in sampler.samples],
        "gauges_at_end": gauges,
    }


def run_soak(config: SoakConfig) -> dict:
    """Start a server, upload the adapters, drive the four phases; the report (see module doc)."""
    SENT.clear()
    account_id, token = create_tenant(config.data_dir)
    with server_process(config) as (url, pid):
        with httpx.Client(base_url=f"{url}/client/v4/accounts/{account_id}/ai", timeout=120,
                          headers={"Authorization": f"Bearer {token}"}) as api:
            upload_adapters(api, config.adapters)
        outcomes, sampler = asyncio.run(drive(url, pid, account_id, token, config))
        gauges = wait_idle_metrics(url)
    return report(config, outcomes, sampler, gauges)


# --- the long version ----------------------------------------------------------------------------

def make_adapters(model_dir: Path, count: int, folder: Path) -> dict[str, Path]:
    """`count` random rank-8 PEFT adapters on every linear of the model (B ~ N(0, 0.02))."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    adapters = {}
    for i in range(count):
        torch.manual_seed(i)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02)
        model.save_pretrained(folder / f"soak-{i}")
        adapters[f"soak-{i}"] = folder / f"soak-{i}"
        base = model.unload()
    return adapters


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["rss_samples"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot([t for t, _, _ in samples], [rss / (1 << 20) for _, rss, _ in samples], lw=1)
    colors = {"warmup": "#eeeeee", "steady": "#e3f0e3", "overload": "#f6dede", "recovery": "#e3e8f6"}
    for phase, color in colors.items():
        times = [t for t, _, p in samples if p == phase]
        if times:
            ax.axvspan(min(times), max(times), color=color, label=phase)
    ax.set_xlabel("seconds")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_title("loraplex soak: resident memory per phase")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(result: dict) -> None:
    print(f"{'phase':<10}{'requests':>9}{'ok':>7}{'429':>7}{'errors':>8}{'ok/s':>8}{'tok/s':>9}{'ttft p99':>10}")
    for phase, s in result["phases"].items():
        p99 = f"{s['ttft_p99_s']:.3f}" if s["ttft_p99_s"] is not None else "-"
        print(f"{phase:<10}{s['requests']:>9}{s['ok']:>7}{s['refused_429_3040']:>7}{s['errors']:>8}"
              f"{s['ok_per_s']:>8}{s['tokens_per_s']:>9}{p99:>10}")
    rss = result["rss"]
    print(f"lost {result['lost']}, inconsistent jobs {len(result['inconsistent_jobs'])}; RSS {rss['start_mib']} MiB "
          f"at start, {rss['after_warmup_mib']} after warm-up, {rss['end_mib']} at end; medians of the first → "
          f"last third: steady {rss['steady_first_third_median_mib']} → {rss['steady_last_third_median_mib']} "
          f"({rss['steady_growth']:+.2%}), whole soak {rss['soak_first_third_median_mib']} → "
          f"{rss['soak_last_third_median_mib']} ({rss['soak_growth']:+.2%})")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--max-pending", type=int, default=8)
    parser.add_argument("--burst", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--kv-cache-memory", type=int, default=64 << 20, help="bytes; 0: the server's default")
    parser.add_argument("--warmup", type=float, default=30)
    parser.add_argument("--steady", type=float, default=300)
    parser.add_argument("--overload", type=float, default=30)
    parser.add_argument("--recovery", type=float, default=30)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out")
    args = parser.parse_args(argv)
    model_dir = Path(args.model)
    if args.model == "default":  # converted once into the usual data dir, as `make serve` does
        from loraplex import env
        from loraplex.models.default_model import ensure_default_model

        model_dir = ensure_default_model(env.data_dir())
    with tempfile.TemporaryDirectory(prefix="loraplex-soak-") as tmp:
        data_dir = Path(tmp) / "data"
        config = SoakConfig(
            model=str(model_dir), adapters=make_adapters(model_dir, args.adapters, Path(tmp) / "adapters"),
            prompts=[f"Customer {i:02d} asks: what is the status of my order?" for i in range(8)],
            data_dir=data_dir, max_tokens=args.max_tokens, clients=args.clients, max_pending=args.max_pending,
            burst=args.burst, kv_cache_memory=args.kv_cache_memory or None,
            dtype="auto", warmup_s=args.warmup, steady_s=args.steady, overload_s=args.overload,
            recovery_s=args.recovery)
        result = run_soak(config)
    result["command"] = "python benchmarks/soak.py " + " ".join(argv)
    write_outputs(result, args.out)
    print_table(result)
    return 0


def write_outputs(result: dict, out: Path) -> None:
    """soak.json (everything but the RSS samples), soak_rss.csv (seconds, MiB, phase; one row per
    second) and soak_rss.png."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {key: value for key, value in result.items() if key != "rss_samples"}
    (out / "soak.json").write_text(json.dumps(summary, indent=1) + "\n")
    rows = ["seconds,rss_mib,phase"] + [f"{t:.2f},{rss / (1 << 20):.1f},{phase}"
                                        for t, rss, phase in result["rss_samples"][::4]]
    (out / "soak_rss.csv").write_text("\n".join(rows) + "\n")
    plot(result, out / "soak_rss.png")


if __name__ == "__main__":
    sys.exit(main())
