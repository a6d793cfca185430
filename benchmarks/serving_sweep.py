"""Finding a server's sustainable request rate for the serving benchmark (`benchmarks/serving.py`):
the bounds a run must hold, the sweep over a grid of offered rates, and where a baseline's sweep
starts and stops given loraplex's rate and the goal ratio."""

from __future__ import annotations

import math
from collections.abc import Callable

from serving_load import Bounds


def holds_bounds(run: dict, bounds: Bounds) -> bool:
    """No errors, nothing cut off, p99 TTFT and (if bounded) p99 TPOT within `bounds`."""
    ttft, tpot = run["ttft_s"]["p99"], run["tpot_s"]["p99"]
    if run["errors"] or run["unfinished"] or ttft is None or ttft > bounds.ttft_s:
        return False
    return bounds.tpot_s is None or tpot is None or tpot <= bounds.tpot_s


def sweep(
    measure: Callable[[float], dict], rates: list[float], holds: Callable[[dict], bool], refine: int,
    start_rate: float | None = None, settled: Callable[[float, float], bool] | None = None,
) -> tuple[list[dict], float]:
    """Find the highest of `rates` whose run `holds`: start at `start_rate` (the highest
    grid rate not above it; default the lowest), go up while runs hold, or down while they fail,
    until the two neighbours are bracketed; then up to `refine` geometric bisection steps between
    them, stopping early once `settled(held, failed)` says a finer rate would change nothing.
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
        if settled is not None and settled(held, failed):
            break
        rate = round(math.sqrt(held * failed), 3)
        runs.append(measure(rate))
        if holds(runs[-1]):
            held = rate
        else:
            failed = rate
    return runs, held


BASELINE_GOALS = {"peft-naive": 5.0, "peft-batched": 2.0}  # loraplex's sustainable rate ≥ this × theirs


def baseline_floor(server: str, loraplex_rate: float | None, grid: list[float]) -> float:
    """The lowest grid rate a baseline's sweep runs at: the highest grid rate at or below loraplex's
    sustainable rate / the goal ratio. A baseline failing there is beaten by more than the goal;
    slower rates would only make its runs longer (each sends at least --min-requests) and could
    not change the verdict. Without a loraplex figure (or for loraplex itself): the lowest grid rate."""
    goal = BASELINE_GOALS.get(server)
    if goal is None or not loraplex_rate:
        return min(grid)
    return max([rate for rate in grid if rate <= loraplex_rate / goal], default=min(grid))


def goal_settled(server: str, loraplex_rate: float | None) -> Callable[[float, float], bool] | None:
    """For a baseline's sweep: whether its bracket (held at `held`, failed at `failed`) already
    decides its goal, i.e. loraplex's rate / `failed` meets the goal (so any rate in between does)
    or loraplex's rate / `held` misses it. None (never settled) for loraplex's own servers."""
    goal = BASELINE_GOALS.get(server)
    if goal is None or not loraplex_rate:
        return None
    return lambda held, failed: loraplex_rate / failed >= goal or loraplex_rate / held < goal


def capacity(server: str, popularity: str, runs: list[dict], sustainable_rate: float) -> dict:
    return {
        "server": server,
        "popularity": popularity,
        "sustainable_rate": sustainable_rate,
        "lowest_rate": min((r["offered_rate"] for r in runs), default=None),
        "peak_output_throughput": max((r["output_throughput"] for r in runs), default=0.0),
        "peak_request_throughput": max((r["request_throughput"] for r in runs), default=0.0),
    }
