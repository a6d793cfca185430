"""Serving benchmark: online load over HTTP, loraplex against the naive way and against base-only.

Each server is started here as a subprocess on a free loopback port and driven over HTTP by one
async client (httpx), streaming on, with the same route and body for all (Workers AI dialect):
- loraplex: `loraplex serve`, adapters uploaded through its finetunes API, requests name one;
- loraplex-base: the same server process and requests, without the `lora` field;
- peft-naive / peft-batched: `benchmarks/baselines/peft_server.py` (FastAPI + transformers + peft),
  one request at a time with `set_adapter`, or static mixed-adapter batches of up to --max-batch.

Workload (fixed seeds; at one offered rate every server and popularity case gets the same arrival
times, prompts and lengths, only the adapters differ): Poisson arrivals at the offered rate for
--duration seconds (longer at low rates, to send at least --min-requests; at most --max-requests);
prompts of N random common English words, N uniform in [16, 64] (about one SmolLM2 token per
word), sent raw; max_tokens uniform in [16, 48]; greedy; generation stops at max_tokens or EOS.
Adapters: --num-adapters random rank-8 PEFT adapters on q,k,v,o,gate,up,down (made with peft,
weights N(0, 0.02)). Adapter popularity follows Punica: distinct (round robin over N), uniform
(uniform over N), zipf (ranks drawn from zipf(1.5) over N), identical (all one adapter).

Per run (server, popularity, offered rate): completed requests/s (until the last completion),
output tokens/s (every token delivered, until the last one), TTFT and TPOT (time per output token
after the first) p50/p90/p99, errors. Before each run the server must answer a one-token request
(so no leftover work delays it). A run is cut off --drain seconds after its last arrival, or as
soon as enough of its requests are over a bound that its p99 must miss it whatever the others do
(requests that waited longer than --ttft-bound for their first token, answered or not; completed
requests slower than --tpot-bound per output token): the rest are not sent. Requests still running
or unsent are counted as unfinished, and the TTFT of those running enters the percentiles as the
time they had waited (a lower bound).

A run "holds" when it has no errors, nothing unfinished, p99 TTFT <= --ttft-bound and p99 TPOT <=
--tpot-bound. The TPOT bound is there because a continuous-batching server keeps admitting new
requests (so TTFT stays low) while every stream slows down; without it an overloaded server could
pass a short run (--tpot-bound 0 turns it off). Per (server, popularity) the sustainable rate is
found on the --rates grid: loraplex runs first, its first case starting at --start-rate, later
cases at the rate the previous case sustained; it goes up while runs hold and down while they fail
until bracketed, then --refine geometric bisection steps. A baseline's sweep starts at, and never
goes below, the grid rate at or under loraplex's rate / the goal ratio: if it fails there,
loraplex beats it by more than the goal, and slower runs would only take longer (the ratio is
then reported as a lower bound); its bisection stops once the goal's verdict cannot change.
Peak throughput is the most output tokens/s any run delivered.

loraplex against base-only is measured at saturation and paired, as this machine's speed drifts
by 10-20 % over minutes: after the sweeps, on the same loraplex process, --peak-rounds rounds each
send one burst per popularity case and one without adapters (--peak-requests at once, the same
prompts and lengths in every burst), in an order that rotates by one each round, so that every
case runs before and after base-only in turn. Per case the ratio is the median over the rounds of
loraplex's output tokens/s over base-only's in the same round, given with a distribution-free 90 %
interval (from 5 rounds on: the lowest and highest of 5, 94 %); "settled" when the interval lies
wholly on one side of the goal, i.e. when the rounds decide the verdict and do not only lean.

Goals (the table at the end, per popularity case): loraplex sustains >= 5x the rate of peft-naive
and >= 2x that of peft-batched under the same bounds, and delivers >= 0.85x the output throughput
of base-only (the paired bursts).

Code: this file runs the servers and the phases; serving_load.py makes the workloads, drives the
load and sums up a run; serving_sweep.py finds sustainable rates; serving_report.py makes the goal
table, the summary, the JSON and the plots.

    python benchmarks/serving.py [--model default|HF_FOLDER]
        [--servers loraplex,loraplex-base,peft-batched,peft-naive] [--popularity distinct,uniform,zipf,identical]
        [--rates 0.125,0.25,0.5,1,2,4,8] [--ttft-bound 5] [--tpot-bound 0.5] [--duration 10] [--threads N]
        [--peak-rounds 5] [--peak-requests 32] [--out benchmarks/out]

Writes serving.json, serving_latency.png (p99 TTFT against offered load, one panel per popularity
case) and serving_throughput.png (per case: sustainable rate, the sweeps' peak throughput, the
paired bursts' ratios) to --out. The defaults take about 10 minutes on 2 CPUs (sweeps 5, bursts
4, start-up 1; the summary says where the time went). On a shared machine, --threads 1 avoids the
collapse of two OpenMP threads per process when other processes compete for the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import httpx

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))  # the serving_* modules, also when this file is loaded by path

from serving_load import (  # noqa: E402
    BASE_ONLY, MODEL_NAME, POPULARITY_CASES, ZIPF_EXPONENT, Bounds, Endpoint, RequestSpec, WorkloadSpec, make_workload,
    request_body, run_load, summarize,
)
from serving_report import RUN_HEADER, SERVERS, goal_table, paired_peaks, print_summary, run_line, write_report  # noqa: E402
from serving_sweep import BASELINE_GOALS, baseline_floor, capacity, goal_settled, holds_bounds, sweep  # noqa: E402

from common import (  # noqa: E402,F401  (make_adapters: also used by tests/test_serving_bench.py)
    create_loraplex_account, free_port, loraplex_executable, make_adapters, thread_env,
)

from loraplex.client import stop_process, wait_until_healthy  # noqa: E402

REPO_DIR = BENCH_DIR.parent
PEFT_SERVER = BENCH_DIR / "baselines" / "peft_server.py"
SERVER_PROCESS = {"peft-naive": "peft-naive", "peft-batched": "peft-batched", "loraplex": "loraplex", "loraplex-base": "loraplex"}
BURST_DRAIN_S = 300.0  # a burst runs to completion unless the server is stuck


# ---------------------------------------------------------------- servers


def peft_command(mode: str, model_dir: Path, adapters_dir: Path, port: int, max_batch: int) -> list[str]:
    return [
        sys.executable, str(PEFT_SERVER), "--model", str(model_dir), "--adapters", str(adapters_dir),
        "--port", str(port), "--mode", mode, "--max-batch", str(max_batch),
    ]


def upload_adapters(endpoint: Endpoint, adapters_dir: Path, names: list[str]) -> None:
    """Register each adapter as a finetune of MODEL_NAME and upload its two files."""
    finetunes = f"{endpoint.base_url}/client/v4/accounts/{endpoint.account_id}/ai/finetunes"
    with httpx.Client(headers=endpoint.headers, timeout=60.0) as client:
        for name in names:
            created = client.post(finetunes, json={"model": MODEL_NAME, "name": name})
            created.raise_for_status()
            finetune_id = created.json()["result"]["id"]
            for file_name in ("adapter_config.json", "adapter_model.safetensors"):
                content = (adapters_dir / name / file_name).read_bytes()
                uploaded = client.post(
                    f"{finetunes}/{finetune_id}/finetune-assets",
                    data={"file_name": file_name}, files={"file": (file_name, content)},
                )
                uploaded.raise_for_status()


@dataclass
class Server:
    """One server process of the benchmark ("peft-naive", "peft-batched" or "loraplex") with the
    adapters available. `start` spawns it and returns at once; `ready` waits until it answers
    (RuntimeError, with its log's tail, if it exits or takes over `ready_timeout_s`), uploads
    loraplex's adapters through its finetunes API and warms it up; `stop` ends it (SIGTERM, then
    SIGKILL after 20 s). Starting every server before waiting on any overlaps their start-ups
    (mostly loading torch and the model); nothing is measured until all are ready, so no
    start-up runs next to a measurement."""

    process: str
    model_dir: Path
    adapters_dir: Path
    adapters: list[str]
    work: Path
    max_batch: int = 16
    rank: int = 8
    threads: int | None = None
    proc: subprocess.Popen | None = field(default=None, init=False)
    endpoint: Endpoint | None = field(default=None, init=False)

    @property
    def log_path(self) -> Path:
        return self.work / f"{self.process}.log"

    def start(self) -> None:
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        if self.process.startswith("peft-"):
            mode = self.process.removeprefix("peft-")
            command = peft_command(mode, self.model_dir, self.adapters_dir, port, self.max_batch)
            self.endpoint = Endpoint(base_url)
        else:
            data_dir = self.work / "loraplex-data"
            data_dir.mkdir(exist_ok=True)
            account_id, token = create_loraplex_account(data_dir)
            command = [
                loraplex_executable(), "serve", "--model", str(self.model_dir), "--model-name", MODEL_NAME,
                "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir), "--max-loras", "16",
                "--max-lora-rank", str(self.rank), "--dtype", "float32", "--log-level", "warning",
            ]
            self.endpoint = Endpoint(base_url, account_id, token)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_DIR, env=thread_env(self.threads)
            )

    def ready(self, ready_timeout_s: float = 300.0) -> Endpoint:
        wait_until_healthy(self.endpoint.base_url, self.proc, ready_timeout_s, self.log_path)
        if self.process == "loraplex":
            upload_adapters(self.endpoint, self.adapters_dir, self.adapters)
        warm_up(self.endpoint, self.adapters)
        return self.endpoint

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 20)


@contextmanager
def launch(
    process: str, model_dir: Path, adapters_dir: Path, adapters: list[str], work: Path, max_batch: int = 16, rank: int = 8,
    threads: int | None = None,
) -> Iterator[Endpoint]:
    """One server alone: started, ready and warmed up, stopped on exit; yields its endpoint."""
    server = Server(process, model_dir, adapters_dir, adapters, work, max_batch, rank, threads)
    try:
        server.start()
        yield server.ready()
    finally:
        server.stop()


def warm_up(endpoint: Endpoint, adapters: list[str]) -> None:
    """One short request per adapter and one without, so first-use costs stay out of the runs."""
    with httpx.Client(timeout=300.0) as client:
        for lora in [None, *adapters]:
            spec = RequestSpec(0.0, "warm up the server", 4, lora)
            response = client.post(endpoint.run_url, json=request_body(spec, stream=False), headers=endpoint.headers)
            if response.status_code != 200 or not response.json().get("success"):
                raise RuntimeError(f"warm-up request (lora={lora}) failed: {response.status_code} {response.text[:300]}")


def settle(endpoint: Endpoint, timeout_s: float = 300.0) -> None:
    """Wait until the server answers a one-token request, so that work left over from a previous
    run (e.g. abandoned requests a server keeps decoding) does not delay the next one."""
    spec = RequestSpec(0.0, "settle", 1, None)
    httpx.post(endpoint.run_url, json=request_body(spec, stream=False), headers=endpoint.headers, timeout=timeout_s)


def measure(
    endpoint: Endpoint, server: str, popularity: str, spec: WorkloadSpec, adapters: list[str], drain_s: float,
    progress: bool = True, give_up: Bounds | None = None,
) -> dict:
    """One run: the workload at `spec.rate` against `endpoint`, summarized (see `run_load` for the cut-offs)."""
    requests = make_workload(spec, popularity, adapters)
    rate = spec.rate if math.isfinite(spec.rate) else None  # None: a burst
    settle(endpoint)
    bar = None
    if progress:
        from tqdm import tqdm

        load = "burst" if rate is None else f"{rate:g}/s"
        bar = tqdm(total=len(requests), desc=f"{server} {popularity} {load}", leave=False, file=sys.stderr)
    try:
        results, start, end = asyncio.run(run_load(endpoint, requests, drain_s, bar.update if bar else None, give_up))
    finally:
        if bar is not None:
            bar.close()
    return {"server": server, "popularity": popularity, "offered_rate": rate, **summarize(results, start, end)}


# ---------------------------------------------------------------- main


@dataclass
class Options:
    """What to measure (the command-line options; see the module docstring)."""

    model_dir: Path
    servers: list[str]
    popularity: list[str]
    rates: list[float]
    start_rate: float | None = None
    duration_s: float = 10.0
    min_requests: int = 6
    max_requests: int = 400
    ttft_bound_s: float = 5.0
    tpot_bound_s: float | None = 0.5
    refine: int = 0
    drain_s: float = 30.0
    num_adapters: int = 16
    rank: int = 8
    max_batch: int = 16
    seed: int = 0
    threads: int | None = None
    peak_rounds: int = 5
    peak_requests: int = 32
    progress: bool = True


def sweep_cases(
    opts: Options, endpoint: Endpoint, server: str, adapters: list[str], loraplex_rates: dict[str, float],
) -> tuple[list[dict], list[dict]]:
    """Every popularity case of one server (base-only: one case). loraplex's sweeps start at
    --start-rate, then at the rate the previous case sustained; a baseline's start at its floor
    (`baseline_floor`, from `loraplex_rates`, loraplex's sustainable rate per case) and go up
    from there. Returns (runs, capacities)."""
    runs, capacities, start_rate = [], [], opts.start_rate
    bounds = Bounds(opts.ttft_bound_s, opts.tpot_bound_s)
    for case in [BASE_ONLY] if server == "loraplex-base" else opts.popularity:
        rates, settled = opts.rates, None
        if server in BASELINE_GOALS:
            start_rate = baseline_floor(server, loraplex_rates.get(case), opts.rates)
            rates = [rate for rate in opts.rates if rate >= start_rate]
            settled = goal_settled(server, loraplex_rates.get(case))

        def run_at(rate: float) -> dict:
            spec = WorkloadSpec(rate, opts.duration_s, opts.max_requests, opts.min_requests, seed=opts.seed)
            run = measure(endpoint, server, case, spec, adapters, opts.drain_s, opts.progress, bounds)
            print(run_line(run), flush=True)
            return run

        holds = partial(holds_bounds, bounds=bounds)
        swept, held = sweep(run_at, rates, holds, opts.refine, start_rate, settled)
        runs += swept
        capacities.append(capacity(server, case, swept, held))
        start_rate = held or opts.start_rate
    return runs, capacities


def peak_rounds(opts: Options, endpoint: Endpoint, adapters: list[str]) -> list[dict]:
    """--peak-rounds rounds of bursts on one loraplex process: in each, a burst of --peak-requests
    per popularity case and one without adapters; round k starts k places further along that list
    (see `paired_peaks` in serving_report.py). A burst runs to completion; each run is tagged
    peak_round."""
    runs = []
    spec = WorkloadSpec(math.inf, 0.0, opts.peak_requests, seed=opts.seed)
    order = [("loraplex-base", BASE_ONLY)] + [("loraplex", case) for case in opts.popularity]
    for peak_round in range(opts.peak_rounds):
        shift = peak_round % len(order)
        for server, popularity in order[shift:] + order[:shift]:
            run = measure(endpoint, server, popularity, spec, adapters, BURST_DRAIN_S, opts.progress)
            print(run_line(run), flush=True)
            runs.append(run | {"peak_round": peak_round})
    return runs


@contextmanager
def timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    """Add the wall time of the block to seconds[phase]."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - start


def benchmark(opts: Options, work: Path) -> dict:
    """Every selected server over every popularity case, swept over rates, then on the loraplex
    process the paired bursts; loraplex first, as the baselines' sweeps start from its rates. A
    server process that fails to start or to serve is reported under "failures" and the others
    still run. The report's "seconds" says where the time went."""
    seconds: dict[str, float] = {}
    begun = time.perf_counter()
    adapters_dir = work / "adapters"
    with timed(seconds, "make adapters"):
        adapters = make_adapters(opts.model_dir, adapters_dir, opts.num_adapters, opts.rank, opts.seed)
    runs, capacities, failures = [], [], []
    processes = sorted(dict.fromkeys(SERVER_PROCESS[s] for s in opts.servers), key=lambda process: process != "loraplex")
    servers = {
        process: Server(process, opts.model_dir, adapters_dir, adapters, work, opts.max_batch, opts.rank, opts.threads)
        for process in processes
    }

    def failed(process: str, exc: Exception) -> None:
        """Record the failure and stop the server; the others go on."""
        print(f"{process}: FAILED: {exc}", file=sys.stderr, flush=True)
        failures.append({"server": process, "error": str(exc)[-2000:]})
        servers.pop(process).stop()

    try:
        with timed(seconds, "start-up"):
            for process, server in list(servers.items()):
                try:
                    server.start()
                except RuntimeError as exc:
                    failed(process, exc)
            endpoints = {}
            for process, server in list(servers.items()):
                try:
                    endpoints[process] = server.ready()
                except (RuntimeError, httpx.HTTPError) as exc:
                    failed(process, exc)
        print(RUN_HEADER, flush=True)
        for process, endpoint in endpoints.items():
            loraplex_rates = {c["popularity"]: c["sustainable_rate"] for c in capacities if c["server"] == "loraplex"}
            try:
                for server in [s for s in opts.servers if SERVER_PROCESS[s] == process]:
                    with timed(seconds, f"{server} sweeps"):
                        server_runs, server_capacities = sweep_cases(opts, endpoint, server, adapters, loraplex_rates)
                    runs += server_runs
                    capacities += server_capacities
                if process == "loraplex" and {"loraplex", "loraplex-base"} <= set(opts.servers):
                    with timed(seconds, "paired bursts"):
                        runs += peak_rounds(opts, endpoint, adapters)
            except (RuntimeError, httpx.HTTPError) as exc:
                failed(process, exc)
            else:
                servers.pop(process).stop()  # done with it
    finally:
        for server in servers.values():
            server.stop()
    config = {key: str(value) if isinstance(value, Path) else value for key, value in asdict(opts).items()}
    del config["progress"]
    workload = {"prompt_words": list(WorkloadSpec.prompt_words), "max_tokens": list(WorkloadSpec.max_tokens)}
    config |= workload | {"zipf_exponent": ZIPF_EXPONENT}
    peaks = paired_peaks(runs)
    goals = goal_table(capacities, opts.popularity, max(opts.rates), peaks)
    seconds["total"] = time.perf_counter() - begun
    return {
        "config": config, "runs": runs, "capacities": capacities, "peaks": peaks, "goals": goals, "failures": failures,
        "seconds": {phase: round(value, 1) for phase, value in seconds.items()},
    }


def parse_list(text: str, allowed: list[str]) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown:
        raise SystemExit(f"unknown {unknown}; choose from {allowed}")
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help='a Hugging Face folder, or "default" (SmolLM2-135M-Instruct)')
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--popularity", default=",".join(POPULARITY_CASES))
    parser.add_argument("--rates", default="0.125,0.25,0.5,1,2,4,8", help="offered loads to sweep, req/s")
    parser.add_argument("--start-rate", type=float, default=4.0, help="loraplex's first sweep starts here")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of arrivals per run")
    parser.add_argument("--min-requests", type=int, default=6, help="low rates run longer to send this many")
    parser.add_argument("--max-requests", type=int, default=400, help="at most this many requests per run")
    parser.add_argument("--ttft-bound", type=float, default=5.0, help="p99 TTFT bound, seconds")
    parser.add_argument("--tpot-bound", type=float, default=0.5, help="p99 TPOT bound, seconds (0: none)")
    parser.add_argument("--refine", type=int, default=0, help="bisection steps after the sweep")
    parser.add_argument("--drain", type=float, default=30.0, help="seconds to wait for requests after the last arrival")
    parser.add_argument("--num-adapters", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=16, help="peft-batched's static batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per server (default: the libraries' choice)")
    parser.add_argument("--peak-rounds", type=int, default=5, help="rounds of loraplex / base-only bursts")
    parser.add_argument("--peak-requests", type=int, default=32, help="requests per burst")
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    if args.model == "default":
        from loraplex import env
        from loraplex.models.default_model import ensure_default_model

        model_dir = ensure_default_model(env.data_dir())
    else:
        model_dir = Path(args.model)
    opts = Options(
        model_dir=model_dir.resolve(),
        servers=parse_list(args.servers, SERVERS),
        popularity=parse_list(args.popularity, POPULARITY_CASES),
        rates=[float(r) for r in args.rates.split(",")],
        start_rate=args.start_rate,
        duration_s=args.duration,
        min_requests=args.min_requests,
        max_requests=args.max_requests,
        ttft_bound_s=args.ttft_bound,
        tpot_bound_s=args.tpot_bound if args.tpot_bound > 0 else None,
        refine=args.refine,
        drain_s=args.drain,
        num_adapters=args.num_adapters,
        rank=args.rank,
        max_batch=args.max_batch,
        seed=args.seed,
        threads=args.threads,
        peak_rounds=args.peak_rounds,
        peak_requests=args.peak_requests,
        progress=not args.no_progress,
    )
    with tempfile.TemporaryDirectory(prefix="loraplex-serving-") as tmp:
        report = benchmark(opts, Path(tmp))
    print_summary(report)
    paths = write_report(report, Path(args.out))
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
