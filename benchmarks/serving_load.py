"""Workload and load generation of the serving benchmark (`benchmarks/serving.py`): seeded
open-loop workloads per adapter-popularity case, a streaming Workers AI client that records what it
sees of each request, and the figures of one run."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import numpy as np

MODEL_NAME = "bench-model"  # the model name in the route; every server accepts it
POPULARITY_CASES = ["distinct", "uniform", "zipf", "identical"]
BASE_ONLY = "base"  # the popularity label of runs without adapters
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

    rate: float  # requests per second; math.inf: a burst of max_requests
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
    `max_requests`; it runs past `duration_s` until it has `min_requests`. A `rate` of math.inf is
    a burst: `max_requests` sent at once."""
    if math.isinf(rate):
        return [0.0] * max_requests
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


@dataclass(frozen=True)
class Bounds:
    """The p99 bounds a run must hold: time to first token and (if given) time per output token."""

    ttft_s: float
    tpot_s: float | None = None


def p99_surely_over(over: int, population: int) -> bool:
    """Whether the p99 (numpy's linear interpolation) of `population` values must exceed a bound
    that `over` of them already exceed, whatever the others are: the two values it interpolates
    between, at sorted positions floor(0.99 (n - 1)) and the next, are then both over it."""
    return population > 0 and over >= population - math.floor(0.99 * (population - 1))


def bounds_surely_missed(results: list[RequestResult], bounds: Bounds, now: float) -> bool:
    """True once the run's p99 TTFT or p99 TPOT must exceed its bound. TTFT: a request counts
    as over once it has waited longer than the bound for its first token (answered or not), out
    of every request of the run, sent or not. TPOT: completed requests over the bound, out of at
    most every request (more values only lower the count needed)."""
    late = sum(1 for r in results if r.sent_at is not None and (r.first_token_at or now) - r.sent_at > bounds.ttft_s)
    if p99_surely_over(late, len(results)):
        return True
    if bounds.tpot_s is None:
        return False
    slow = sum(1 for r in results if r.done_at is not None and (t := r.tpot()) is not None and t > bounds.tpot_s)
    return p99_surely_over(slow, len(results))


async def run_load(
    endpoint: Endpoint,
    requests: list[RequestSpec],
    drain_s: float,
    on_done: Callable[[], None] | None = None,
    give_up: Bounds | None = None,
) -> tuple[list[RequestResult], float, float]:
    """Send each request at its `send_at` (open loop) and wait for all of them, but no longer than
    `drain_s` after the last send time, nor (with `give_up`) once a p99 is sure to miss its bound
    (`bounds_surely_missed`). Requests still running or not yet sent then are cancelled and marked unfinished.
    Returns (results in request order, start time, cut-off or end time)."""
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
            if give_up is not None and bounds_surely_missed(results, give_up, time.perf_counter()):
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
