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
soon as everything is sent and more than 1 % of requests have waited longer than --ttft-bound for
their first token (the p99 cannot hold then); requests still running are counted as unfinished and
their TTFT enters the percentiles as the time they had waited (a lower bound).

A run "holds" when it has no errors, nothing unfinished, p99 TTFT <= --ttft-bound and p99 TPOT <=
--tpot-bound. The TPOT bound is there because a continuous-batching server keeps admitting new
requests (so TTFT stays low) while every stream slows down; without it an overloaded server could
pass a short run (--tpot-bound 0 turns it off). Per (server, popularity) the sustainable rate is
found on the --rates grid: loraplex runs first, its first case starting at --start-rate, later
cases at the rate the previous case sustained; it goes up while runs hold and down while they fail
until bracketed, then --refine geometric bisection steps. A baseline's sweep starts at, and never
goes below, the grid rate at or under loraplex's rate / (2 × the goal ratio): if it fails there,
loraplex beats it by at least twice the goal, and slower runs would only take longer (the ratio
is then reported as a lower bound). Peak throughput is the most output tokens/s any run delivered.

Goals (the table at the end, per popularity case): loraplex sustains >= 5x the rate of peft-naive
and >= 2x that of peft-batched under the same bounds, and delivers >= 0.85x the peak throughput of
its own base-only runs.

    python benchmarks/serving.py [--model default|HF_FOLDER]
        [--servers loraplex,loraplex-base,peft-batched,peft-naive] [--popularity distinct,uniform,zipf,identical]
        [--rates 0.125,0.25,0.5,1,2,4,8] [--ttft-bound 5] [--tpot-bound 0.5] [--duration 10] [--threads N]
        [--out benchmarks/out]

Writes serving.json, serving_latency.png (p99 TTFT against offered load, one panel per popularity
case) and serving_throughput.png (sustainable rate and peak throughput per case) to --out. The
defaults take about 9-10 minutes on 2 CPUs. On a shared machine, --threads 1 avoids the collapse of
two OpenMP threads per process when other processes compete for the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import httpx
import numpy as np

from loraplex.client import stop_process, wait_until_healthy

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
PEFT_SERVER = BENCH_DIR / "baselines" / "peft_server.py"
MODEL_NAME = "bench-model"  # the model name in the route; every server accepts it
POPULARITY_CASES = ["distinct", "uniform", "zipf", "identical"]
BASE_ONLY = "base"  # the popularity label of runs without adapters
SERVERS = ["loraplex", "loraplex-base", "peft-batched", "peft-naive"]
SERVER_PROCESS = {"peft-naive": "peft-naive", "peft-batched": "peft-batched", "loraplex": "loraplex", "loraplex-base": "loraplex"}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ZIPF_EXPONENT = 1.5
WORDS = (
    "time year people way day man thing woman life child world school state family student group "
    "country problem hand part place case week company system program question work government "
    "number night point home water room mother area money story fact month lot right study book "
    "eye job word business issue side kind head house service friend father power hour game line "
    "end member law car city community name president team minute idea kid body information back "
    "parent face others level office door health person art war history party result change "
    "morning reason research girl guy moment air teacher force education river music forest train"
).split()


# ---------------------------------------------------------------- workload


@dataclass(frozen=True)
class WorkloadSpec:
    """One offered load. Ranges are inclusive; `seed` fixes arrivals, prompts, lengths and adapters."""

    rate: float
    duration_s: float
    max_requests: int = 1000
    min_requests: int = 0  # low rates run longer than duration_s to send at least this many
    prompt_words: tuple[int, int] = (16, 64)
    max_tokens: tuple[int, int] = (16, 48)
    seed: int = 0


@dataclass(frozen=True)
class RequestSpec:
    send_at: float  # seconds after the start of the run
    prompt: str
    max_tokens: int
    lora: str | None


def poisson_arrivals(
    rate: float, duration_s: float, max_requests: int, rng: random.Random, min_requests: int = 0
) -> list[float]:
    """Send times of a Poisson process of `rate` per second within [0, duration_s), at most
    `max_requests`; it runs past `duration_s` until it has `min_requests`."""
    times, t = [], rng.expovariate(rate)
    while len(times) < max_requests and (t < duration_s or len(times) < min_requests):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def adapter_indices(popularity: str, n_requests: int, n_adapters: int, rng: random.Random) -> list[int]:
    """Which of `n_adapters` each request uses, by Punica's popularity cases."""
    if popularity == "distinct":
        return [i % n_adapters for i in range(n_requests)]
    if popularity == "uniform":
        return [rng.randrange(n_adapters) for _ in range(n_requests)]
    if popularity == "zipf":
        weights = [1.0 / (rank + 1) ** ZIPF_EXPONENT for rank in range(n_adapters)]
        return rng.choices(range(n_adapters), weights=weights, k=n_requests)
    if popularity == "identical":
        return [0] * n_requests
    raise ValueError(f"unknown popularity {popularity!r}; expected one of {POPULARITY_CASES}")


def random_prompt(n_words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def make_workload(spec: WorkloadSpec, popularity: str, adapters: list[str]) -> list[RequestSpec]:
    """The requests of one run. Arrivals, prompts and lengths depend only on (seed, rate), so every
    popularity case and server sees the same ones; `popularity` BASE_ONLY (or no adapters) sends none."""
    arrival_rng = random.Random(f"arrivals:{spec.seed}:{spec.rate}")
    text_rng = random.Random(f"text:{spec.seed}:{spec.rate}")
    send_times = poisson_arrivals(spec.rate, spec.duration_s, spec.max_requests, arrival_rng, spec.min_requests)
    n = len(send_times)
    if popularity == BASE_ONLY or not adapters:
        loras: list[str | None] = [None] * n
    else:
        popularity_rng = random.Random(f"popularity:{spec.seed}:{spec.rate}:{popularity}")
        loras = [adapters[i] for i in adapter_indices(popularity, n, len(adapters), popularity_rng)]
    requests = []
    for send_at, lora in zip(send_times, loras):
        prompt = random_prompt(text_rng.randint(*spec.prompt_words), text_rng)
        requests.append(RequestSpec(send_at, prompt, text_rng.randint(*spec.max_tokens), lora))
    return requests


# ---------------------------------------------------------------- client


@dataclass
class RequestResult:
    """What the client saw of one request; times are `time.perf_counter()` values."""

    sent_at: float | None = None
    first_token_at: float | None = None
    done_at: float | None = None
    last_token_at: float | None = None
    received_tokens: int = 0  # non-empty deltas so far (the token count while a request runs)
    output_tokens: int = 0  # of a completed request: `usage.completion_tokens`, else received_tokens
    prompt_tokens: int | None = None
    error: str | None = None

    def ttft(self) -> float:
        return self.first_token_at - self.sent_at

    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.done_at - self.first_token_at) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Endpoint:
    """Where a server's Workers AI route lives and how to authenticate to it."""

    base_url: str
    account_id: str = "bench"
    token: str = "unused"

    @property
    def run_url(self) -> str:
        return f"{self.base_url}/client/v4/accounts/{self.account_id}/ai/run/{MODEL_NAME}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def request_body(spec: RequestSpec, stream: bool = True) -> dict:
    body = {"prompt": spec.prompt, "raw": True, "max_tokens": spec.max_tokens, "temperature": 0, "stream": stream}
    if spec.lora is not None:
        body["lora"] = spec.lora
    return body


async def send_request(client: httpx.AsyncClient, endpoint: Endpoint, spec: RequestSpec, result: RequestResult) -> None:
    """Send one streaming request and fill `result` as events arrive (so a cancelled request keeps
    what it received). Output tokens come from a `usage` in the stream when the server sends one,
    else from the number of non-empty deltas."""
    result.sent_at = time.perf_counter()
    try:
        async with client.stream("POST", endpoint.run_url, json=request_body(spec), headers=endpoint.headers) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    result.done_at = time.perf_counter()
                    break
                event = json.loads(data)
                if event.get("errors") or event.get("error"):
                    result.error = f"error event: {data[:200]}"
                    return
                if event.get("response"):
                    result.received_tokens += 1
                    result.last_token_at = time.perf_counter()
                    if result.first_token_at is None:
                        result.first_token_at = result.last_token_at
                if usage := event.get("usage"):
                    result.output_tokens = usage.get("completion_tokens", 0)
                    result.prompt_tokens = usage.get("prompt_tokens")
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return
    if result.done_at is None:
        result.error = "stream ended without [DONE]"
        return
    if result.first_token_at is None:  # nothing but EOS: the first "token" is the end
        result.first_token_at = result.done_at
    result.output_tokens = result.output_tokens or result.received_tokens


def late_count(results: list[RequestResult], ttft_bound_s: float, now: float) -> int:
    """Requests whose first token came, or is still awaited, later than `ttft_bound_s` after sending."""
    return sum(
        1 for r in results
        if r.sent_at is not None and ((r.first_token_at or now) - r.sent_at > ttft_bound_s)
    )


def bound_surely_missed(results: list[RequestResult], ttft_bound_s: float, now: float) -> bool:
    """True once more than 1 % of the requests are late, so the p99 TTFT must exceed the bound."""
    return late_count(results, ttft_bound_s, now) > 0.01 * (len(results) - 1)


async def run_load(
    endpoint: Endpoint,
    requests: list[RequestSpec],
    drain_s: float,
    on_done: Callable[[], None] | None = None,
    give_up_ttft_s: float | None = None,
) -> tuple[list[RequestResult], float, float]:
    """Send each request at its `send_at` (open loop) and wait for all of them, but no longer than
    `drain_s` after the last send time, nor (with `give_up_ttft_s`) once every request is sent and
    the p99 TTFT is sure to exceed it. Requests still running then are cancelled and marked
    unfinished. Returns (results in request order, start time, cut-off or end time)."""
    results = [RequestResult() for _ in requests]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    timeout = httpx.Timeout(30.0, read=None, pool=None)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        start = time.perf_counter()

        async def send_on_time(spec: RequestSpec, result: RequestResult) -> None:
            await asyncio.sleep(max(0.0, start + spec.send_at - time.perf_counter()))
            await send_request(client, endpoint, spec, result)
            if on_done is not None:
                on_done()

        tasks = [asyncio.create_task(send_on_time(s, r)) for s, r in zip(requests, results)]
        last_send = max((s.send_at for s in requests), default=0.0)
        deadline = start + last_send + drain_s
        pending = set(tasks)
        while pending and time.perf_counter() < deadline:
            _, pending = await asyncio.wait(pending, timeout=min(0.25, max(0.0, deadline - time.perf_counter())))
            all_sent = time.perf_counter() >= start + last_send
            if give_up_ttft_s is not None and all_sent and bound_surely_missed(results, give_up_ttft_s, time.perf_counter()):
                break
        if pending:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        end = time.perf_counter()
    for result in results:
        if result.error is None and result.done_at is None:
            result.error = "unfinished"
    return results, start, end


# ---------------------------------------------------------------- report


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(np.asarray(values, dtype=float), [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99)}


def summarize(results: list[RequestResult], start: float, end: float) -> dict:
    """Figures of one run. Request throughput counts completed requests until the last completion;
    output throughput counts every token delivered until the last one. TTFT percentiles include
    unfinished requests at the time they had waited (a lower bound)."""
    completed = [r for r in results if r.error is None]
    unfinished = [r for r in results if r.error == "unfinished"]
    failed = [r for r in results if r.error not in (None, "unfinished")]
    ttfts = [r.ttft() for r in completed]
    ttfts += [(r.first_token_at or end) - r.sent_at for r in unfinished if r.sent_at is not None]
    tpots = [t for r in completed if (t := r.tpot()) is not None]
    elapsed = max((r.done_at for r in completed), default=end) - start
    output_tokens = sum(r.output_tokens for r in completed)
    # Tokens delivered per second, the partial outputs of cut-off requests included, so that an
    # overloaded run still measures what the server produced.
    delivered = output_tokens + sum(r.received_tokens for r in unfinished)
    last_activity = max([r.done_at for r in completed] + [r.last_token_at for r in unfinished if r.last_token_at], default=end)
    prompt_tokens = [r.prompt_tokens for r in completed if r.prompt_tokens is not None]
    return {
        "requests": len(results),
        "completed": len(completed),
        "errors": len(failed),
        "unfinished": len(unfinished),
        "error_samples": sorted({r.error for r in failed})[:3],
        "elapsed_s": elapsed,
        "request_throughput": len(completed) / elapsed if elapsed > 0 else 0.0,
        "output_throughput": delivered / (last_activity - start) if last_activity > start else 0.0,
        "ttft_s": percentiles(ttfts),
        "tpot_s": percentiles(tpots),
        "latency_s": percentiles([r.done_at - r.sent_at for r in completed]),
        "mean_output_tokens": output_tokens / len(completed) if completed else None,
        "mean_prompt_tokens": float(np.mean(prompt_tokens)) if prompt_tokens else None,
    }


def holds_bounds(run: dict, ttft_bound_s: float, tpot_bound_s: float | None = None) -> bool:
    """No errors, nothing cut off, p99 TTFT <= ttft_bound_s and (if given) p99 TPOT <= tpot_bound_s."""
    ttft, tpot = run["ttft_s"]["p99"], run["tpot_s"]["p99"]
    if run["errors"] or run["unfinished"] or ttft is None or ttft > ttft_bound_s:
        return False
    return tpot_bound_s is None or tpot is None or tpot <= tpot_bound_s


def sweep(
    measure: Callable[[float], dict], rates: list[float], holds: Callable[[dict], bool], refine: int,
    start_rate: float | None = None,
) -> tuple[list[dict], float]:
    """Find the highest of `rates` whose run `holds`: start at `start_rate` (the highest
    grid rate not above it; default the lowest), go up while runs hold, or down while they fail,
    until the two neighbours are bracketed; then `refine` geometric bisection steps between them.
    Returns (runs in the order made, the highest rate that held; 0.0 when none did)."""
    grid = sorted(rates)
    i = max([k for k, rate in enumerate(grid) if start_rate is not None and rate <= start_rate], default=0)
    runs, held, failed = [], 0.0, None
    while 0 <= i < len(grid):
        runs.append(measure(grid[i]))
        if holds(runs[-1]):
            held, i = grid[i], i + 1
            if failed is not None:
                break
        else:
            failed, i = grid[i], i - 1
            if held:
                break
    for _ in range(refine if held and failed else 0):
        rate = round(math.sqrt(held * failed), 3)
        runs.append(measure(rate))
        if holds(runs[-1]):
            held = rate
        else:
            failed = rate
    return runs, held


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def rate_ratio(rate: float | None, baseline: dict | None, grid_top: float) -> tuple[float | None, bool]:
    """(rate / the baseline's sustainable rate, whether that is only a lower bound). A baseline that
    held at no rate it was run at is counted as sustaining the lowest of them (its true rate is
    lower); a `rate` at the top of the grid may be higher still. Either way the ratio is only a
    lower bound."""
    if not rate or baseline is None:
        return None, False
    if baseline["sustainable_rate"] == 0:
        return rate / baseline["lowest_rate"], True
    return rate / baseline["sustainable_rate"], rate >= grid_top


BASELINE_GOALS = {"peft-naive": 5.0, "peft-batched": 2.0}  # loraplex's sustainable rate ≥ this × theirs
GOALS = {  # goal name: (ratio key, minimum)
    "vs_naive>=5x": ("loraplex_vs_naive_rate", BASELINE_GOALS["peft-naive"]),
    "vs_batched>=2x": ("loraplex_vs_batched_rate", BASELINE_GOALS["peft-batched"]),
    "vs_base>=0.85x": ("loraplex_vs_base_throughput", 0.85),
}


def baseline_floor(server: str, loraplex_rate: float | None, grid: list[float]) -> float:
    """The lowest grid rate a baseline's sweep runs at: the highest grid rate at or below loraplex's
    sustainable rate / (2 × the goal ratio). A baseline failing there is still beaten by twice
    the goal; slower rates would only make its runs longer (each sends at least --min-requests).
    Without a loraplex figure (or for loraplex itself): the lowest grid rate."""
    goal = BASELINE_GOALS.get(server)
    if goal is None or not loraplex_rate:
        return min(grid)
    return max([rate for rate in grid if rate <= loraplex_rate / (2 * goal)], default=min(grid))


def goal_table(capacities: list[dict], popularity_cases: list[str], grid_top: float) -> list[dict]:
    """Per popularity case: loraplex's sustainable rate against each baseline's, its peak throughput
    against base-only's, and whether each goal is met (None where a side was not measured).
    `lower_bounds` names the ratios that are only lower bounds (see `rate_ratio`)."""
    by_key = {(c["server"], c["popularity"]): c for c in capacities}

    def get(server: str, popularity: str, key: str) -> float | None:
        entry = by_key.get((server, popularity))
        return None if entry is None else entry[key]

    rows = []
    for case in popularity_cases:
        entries = {server: by_key.get((server, BASE_ONLY if server == "loraplex-base" else case)) for server in SERVERS}
        row, lower_bounds = {"popularity": case}, []
        for key, numerator, denominator in (
            ("loraplex_vs_naive_rate", "loraplex", "peft-naive"),
            ("loraplex_vs_batched_rate", "loraplex", "peft-batched"),
            ("loraplex_vs_base_rate", "loraplex", "loraplex-base"),
            ("batched_vs_naive_rate", "peft-batched", "peft-naive"),
        ):
            rate = get(numerator, case, "sustainable_rate")
            row[key], is_lower_bound = rate_ratio(rate, entries[denominator], grid_top)
            if is_lower_bound:
                lower_bounds.append(key)
        row["loraplex_vs_base_throughput"] = ratio(
            get("loraplex", case, "peak_output_throughput"), get("loraplex-base", BASE_ONLY, "peak_output_throughput")
        )
        row["lower_bounds"] = lower_bounds
        row["goals_met"] = {
            goal: None if row[key] is None or (row[key] < minimum and key in lower_bounds) else row[key] >= minimum
            for goal, (key, minimum) in GOALS.items()
        }
        rows.append(row)
    return rows


def capacity(server: str, popularity: str, runs: list[dict], sustainable_rate: float) -> dict:
    return {
        "server": server,
        "popularity": popularity,
        "sustainable_rate": sustainable_rate,
        "lowest_rate": min((r["offered_rate"] for r in runs), default=None),
        "peak_output_throughput": max((r["output_throughput"] for r in runs), default=0.0),
        "peak_request_throughput": max((r["request_throughput"] for r in runs), default=0.0),
    }


def _fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def run_line(run: dict) -> str:
    ttft, tpot = run["ttft_s"], run["tpot_s"]
    return (
        f"{run['server']:<14} {run['popularity']:<9} {run['offered_rate']:>6.3g} {run['completed']:>4}/{run['requests']:<4}"
        f" {run['errors']:>4} {run['unfinished']:>4} {run['request_throughput']:>6.2f} {run['output_throughput']:>7.1f}"
        f" {_fmt(ttft['p50'])} {_fmt(ttft['p90'])} {_fmt(ttft['p99'])}"
        f"  {_fmt(tpot['p50'], 3)} {_fmt(tpot['p99'], 3)}"
    )


RUN_HEADER = (
    f"{'server':<14} {'pop':<9} {'rate':>6} {'done':>9} {'err':>4} {'cut':>4} {'req/s':>6} {'tok/s':>7}"
    " TTFT p50/p90/p99 s  TPOT p50/p99 s"
)


def slo_text(config: dict) -> str:
    text = f"p99 TTFT <= {config['ttft_bound_s']:g} s"
    return text if config.get("tpot_bound_s") is None else f"{text}, p99 TPOT <= {config['tpot_bound_s']:g} s"


def print_summary(report: dict) -> None:
    for failure in report.get("failures", []):
        print(f"\n{failure['server']} FAILED: {failure['error'][-500:]}")
    print(f"\nsustainable rate ({slo_text(report['config'])}) and peak output throughput")
    print(f"{'server':<14} {'pop':<9} {'req/s':>7} {'peak tok/s':>10}")
    top = max(report["config"].get("rates") or [math.inf])
    for c in report["capacities"]:
        rate = f"{c['sustainable_rate']:.3g}" + ("+" if c["sustainable_rate"] >= top else "")
        print(f"{c['server']:<14} {c['popularity']:<9} {rate:>7} {c['peak_output_throughput']:>10.1f}")
    columns = [  # (heading, key)
        ("lp/naive", "loraplex_vs_naive_rate"), ("lp/batched", "loraplex_vs_batched_rate"),
        ("lp/base tok/s", "loraplex_vs_base_throughput"), ("lp/base rate", "loraplex_vs_base_rate"),
        ("batched/naive", "batched_vs_naive_rate"),
    ]
    print(f"\n{'pop':<9} " + " ".join(f"{h:>13}" for h, _ in columns) + "  goals " + ", ".join(GOALS))
    for row in report["goals"]:
        cells = [(">" if key in row["lower_bounds"] else "") + _fmt(row[key], 2, "x") for _, key in columns]
        met = " ".join({True: "yes", False: "NO", None: "-"}[v] for v in row["goals_met"].values())
        print(f"{row['popularity']:<9} " + " ".join(f"{c:>13}" for c in cells) + f"  {met}")
    print("(lp: loraplex; '+': held at the top of the grid, so at least this rate;")
    print(" '>': a lower bound, as the baseline held at no rate it was run at, or loraplex held at the top)")


def plot(report: dict, out: Path) -> list[Path]:
    """serving_latency.png (p99 TTFT against offered rate, one panel per popularity case) and
    serving_throughput.png (sustainable rate and peak output tokens/s per popularity case)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullLocator

    runs, bound = report["runs"], report["config"]["ttft_bound_s"]
    cases = report["config"]["popularity"]
    servers = [s for s in SERVERS if any(r["server"] == s for r in runs)]
    fig, axes = plt.subplots(1, len(cases), figsize=(4 * len(cases), 3.4), squeeze=False, sharey=True)
    for ax, case in zip(axes[0], cases):
        for server in servers:
            wanted = BASE_ONLY if server == "loraplex-base" else case
            mine = [r for r in runs if r["server"] == server and r["popularity"] == wanted]
            mine.sort(key=lambda r: r["offered_rate"])
            if not mine:
                continue
            xs, ys = [r["offered_rate"] for r in mine], [r["ttft_s"]["p99"] or float("nan") for r in mine]
            (line,) = ax.plot(xs, ys, marker="o", label=server, linestyle="--" if wanted == BASE_ONLY else "-")
            cut = [(x, y) for x, y, r in zip(xs, ys, mine) if r["unfinished"]]
            if cut:  # cut-off runs: their p99 is only a lower bound
                ax.plot(*zip(*cut), marker="o", markersize=9, markerfacecolor="white", color=line.get_color(), linestyle="")
        ax.axhline(bound, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        rates = sorted({r["offered_rate"] for r in runs})
        for axis, ticks in ((ax.xaxis, rates), (ax.yaxis, [0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100])):
            axis.set_major_locator(FixedLocator(ticks))
            axis.set_major_formatter(FormatStrFormatter("%g"))
            axis.set_minor_locator(NullLocator())
        ax.set_title(case)
        ax.set_xlabel("offered load (req/s)")
    axes[0][0].set_ylabel("p99 TTFT (s); hollow: run cut off")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    latency_png = out / "serving_latency.png"
    fig.savefig(latency_png, dpi=100)
    plt.close(fig)

    caps = {(c["server"], c["popularity"]): c for c in report["capacities"]}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    width = 0.8 / max(1, len(servers))
    for k, server in enumerate(servers):
        entries = [caps.get((server, BASE_ONLY if server == "loraplex-base" else case)) for case in cases]
        xs = [i + width * (k - (len(servers) - 1) / 2) for i in range(len(cases))]
        for ax, key in zip(axes, ["sustainable_rate", "peak_output_throughput"]):
            ax.bar(xs, [e[key] if e else 0 for e in entries], width=width, label=server)
    for ax, label in zip(axes, ["sustainable req/s", "peak output tokens/s"]):
        ax.set_xticks(range(len(cases)), cases)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    axes[0].set_title(slo_text(report["config"]), fontsize=9)
    fig.tight_layout()
    throughput_png = out / "serving_throughput.png"
    fig.savefig(throughput_png, dpi=100)
    plt.close(fig)
    return [latency_png, throughput_png]


def write_report(report: dict, out: Path) -> list[Path]:
    """serving.json plus the two plots in `out`; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "serving.json"
    json_path.write_text(json.dumps(report, indent=2))
    return [json_path, *plot(report, out)]


# ---------------------------------------------------------------- servers


def make_adapters(model_dir: Path, folder: Path, count: int, rank: int = 8, seed: int = 0) -> list[str]:
    """`count` random PEFT LoRA adapters (all seven projections, weights N(0, 0.02)) saved as
    folder/<name>/; returns the names."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, init_lora_weights=False)
    names = [f"adapter-{i:02d}" for i in range(count)]
    model = get_peft_model(base, config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "lora_" in pname:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:  # peft writes a non-"default" adapter into <dir>/<name>/
        model.save_pretrained(folder, selected_adapters=[name])
        assert (folder / name / "adapter_model.safetensors").is_file(), f"peft did not write {folder / name}"
    return names


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def server_process(
    command: list[str], port: int, log_path: Path, threads: int | None = None, ready_timeout_s: float = 300.0
) -> Iterator[str]:
    """Start `command` (with `threads` CPU threads for OpenMP, MKL and numba, if given), yield its
    base URL once `GET /healthz` answers 200, stop it on exit (SIGTERM, then SIGKILL after 20 s).
    Raises RuntimeError, with the log's tail, if it exits or is not ready in time."""
    base_url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_DIR, env=thread_env(threads))
    try:
        wait_until_healthy(base_url, proc, ready_timeout_s, log_path)
        yield base_url
    finally:
        stop_process(proc, 20)


def thread_env(threads: int | None) -> dict[str, str]:
    """This process's environment, with the thread-count variables set to `threads` (if given)."""
    env = dict(os.environ)
    if threads is not None:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            env[name] = str(threads)
    return env


def log_tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def peft_command(mode: str, model_dir: Path, adapters_dir: Path, port: int, max_batch: int) -> list[str]:
    return [
        sys.executable, str(PEFT_SERVER), "--model", str(model_dir), "--adapters", str(adapters_dir),
        "--port", str(port), "--mode", mode, "--max-batch", str(max_batch),
    ]


def loraplex_executable() -> str:
    candidate = Path(sys.executable).parent / "loraplex"
    return str(candidate) if candidate.exists() else "loraplex"


def create_loraplex_account(data_dir: Path) -> tuple[str, str]:
    """`loraplex accounts create bench` (before the server starts); returns (account_id, token)."""
    done = subprocess.run(
        [loraplex_executable(), "accounts", "create", "bench", "--data-dir", str(data_dir)],
        capture_output=True, text=True, cwd=REPO_DIR,
    )
    if done.returncode != 0:
        raise RuntimeError(f"`loraplex accounts create` failed ({done.returncode}): {done.stderr[-2000:]}")
    out = done.stdout
    for line in reversed(out.splitlines()):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "account_id" in record:
            return record["account_id"], record["token"]
    raise RuntimeError(f"`loraplex accounts create` printed no account: {out!r}")


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


@contextmanager
def launch(
    process: str, model_dir: Path, adapters_dir: Path, adapters: list[str], work: Path, max_batch: int = 16, rank: int = 8,
    threads: int | None = None,
) -> Iterator[Endpoint]:
    """Start one server process ("peft-naive", "peft-batched" or "loraplex") with the adapters
    available, and yield its endpoint."""
    port, log_path = free_port(), work / f"{process}.log"
    if process.startswith("peft-"):
        command = peft_command(process.removeprefix("peft-"), model_dir, adapters_dir, port, max_batch)
        with server_process(command, port, log_path, threads) as base_url:
            yield Endpoint(base_url)
        return
    data_dir = work / "loraplex-data"
    data_dir.mkdir(exist_ok=True)
    account_id, token = create_loraplex_account(data_dir)
    command = [
        loraplex_executable(), "serve", "--model", str(model_dir), "--model-name", MODEL_NAME, "--host", "127.0.0.1",
        "--port", str(port), "--data-dir", str(data_dir), "--max-loras", "16", "--max-lora-rank", str(rank),
        "--dtype", "float32", "--log-level", "warning",
    ]
    with server_process(command, port, log_path, threads) as base_url:
        endpoint = Endpoint(base_url, account_id, token)
        upload_adapters(endpoint, adapters_dir, adapters)
        yield endpoint


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
    progress: bool = True, give_up_ttft_s: float | None = None,
) -> dict:
    """One run: the workload at `spec.rate` against `endpoint`, summarized (see `run_load` for the cut-offs)."""
    requests = make_workload(spec, popularity, adapters)
    settle(endpoint)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(requests), desc=f"{server} {popularity} {spec.rate:g}/s", leave=False, file=sys.stderr)
    try:
        results, start, end = asyncio.run(run_load(endpoint, requests, drain_s, bar.update if bar else None, give_up_ttft_s))
    finally:
        if bar is not None:
            bar.close()
    return {"server": server, "popularity": popularity, "offered_rate": spec.rate, **summarize(results, start, end)}


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
    refine: int = 1
    drain_s: float = 30.0
    num_adapters: int = 16
    rank: int = 8
    max_batch: int = 16
    seed: int = 0
    threads: int | None = None
    progress: bool = True


def sweep_cases(
    opts: Options, endpoint: Endpoint, server: str, adapters: list[str], loraplex_rates: dict[str, float],
) -> tuple[list[dict], list[dict]]:
    """Every popularity case of one server (base-only: one case). loraplex's sweeps start at
    --start-rate, then at the rate the previous case sustained; a baseline's start at its floor
    (`baseline_floor`, from `loraplex_rates`, loraplex's sustainable rate per case) and go up
    from there. Returns (runs, capacities)."""
    runs, capacities, start_rate = [], [], opts.start_rate
    for case in [BASE_ONLY] if server == "loraplex-base" else opts.popularity:
        rates = opts.rates
        if server in BASELINE_GOALS:
            start_rate = baseline_floor(server, loraplex_rates.get(case), opts.rates)
            rates = [rate for rate in opts.rates if rate >= start_rate]

        def run_at(rate: float) -> dict:
            spec = WorkloadSpec(rate, opts.duration_s, opts.max_requests, opts.min_requests, seed=opts.seed)
            run = measure(endpoint, server, case, spec, adapters, opts.drain_s, opts.progress, opts.ttft_bound_s)
            print(run_line(run), flush=True)
            return run

        holds = partial(holds_bounds, ttft_bound_s=opts.ttft_bound_s, tpot_bound_s=opts.tpot_bound_s)
        swept, held = sweep(run_at, rates, holds, opts.refine, start_rate)
        runs += swept
        capacities.append(capacity(server, case, swept, held))
        start_rate = held or opts.start_rate
    return runs, capacities


def benchmark(opts: Options, work: Path) -> dict:
    """Every selected server over every popularity case, swept over rates; loraplex first, as
    the baselines' sweeps start from its rates. A server process that fails to start or to serve
    is reported under "failures" and the others still run."""
    adapters_dir = work / "adapters"
    adapters = make_adapters(opts.model_dir, adapters_dir, opts.num_adapters, opts.rank, opts.seed)
    runs, capacities, failures = [], [], []
    print(RUN_HEADER, flush=True)
    processes = sorted(dict.fromkeys(SERVER_PROCESS[s] for s in opts.servers), key=lambda process: process != "loraplex")
    for process in processes:
        loraplex_rates = {c["popularity"]: c["sustainable_rate"] for c in capacities if c["server"] == "loraplex"}
        try:
            launched = launch(
                process, opts.model_dir, adapters_dir, adapters, work, opts.max_batch, opts.rank, opts.threads
            )
            with launched as endpoint:
                warm_up(endpoint, adapters)
                for server in [s for s in opts.servers if SERVER_PROCESS[s] == process]:
                    server_runs, server_capacities = sweep_cases(opts, endpoint, server, adapters, loraplex_rates)
                    runs += server_runs
                    capacities += server_capacities
        except (RuntimeError, httpx.HTTPError) as exc:
            print(f"{process}: FAILED: {exc}", file=sys.stderr, flush=True)
            failures.append({"server": process, "error": str(exc)[-2000:]})
    config = {key: str(value) if isinstance(value, Path) else value for key, value in asdict(opts).items()}
    del config["progress"]
    workload = {"prompt_words": list(WorkloadSpec.prompt_words), "max_tokens": list(WorkloadSpec.max_tokens)}
    config |= workload | {"zipf_exponent": ZIPF_EXPONENT}
    goals = goal_table(capacities, opts.popularity, max(opts.rates))
    return {"config": config, "runs": runs, "capacities": capacities, "goals": goals, "failures": failures}


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
    parser.add_argument("--refine", type=int, default=1, help="bisection steps after the sweep")
    parser.add_argument("--drain", type=float, default=30.0, help="seconds to wait for requests after the last arrival")
    parser.add_argument("--num-adapters", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=16, help="peft-batched's static batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per server (default: the libraries' choice)")
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
        progress=not args.no_progress,
    )
    with tempfile.TemporaryDirectory(prefix="loraplex-serving-") as tmp:
        report = benchmark(opts, Path(tmp))
    print_summary(report)
    paths = write_report(report, Path(args.out))
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
