"""Smoke test of the serving benchmark harness (benchmarks/serving*.py) against the naive peft baseline.

The workload generators are checked exactly; the live part drives a tiny random Llama behind
benchmarks/baselines/peft_server.py for a couple of seconds and checks the shape of what comes
back, never its speed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import statistics
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from module_loading import load_module
from tiny_models import make_tiny_model

SERVING_PY = Path(__file__).resolve().parent.parent / "benchmarks" / "serving.py"


serving = load_module(SERVING_PY, "loraplex_bench_serving")  # puts benchmarks/ on sys.path for these:
import serving_load as load  # noqa: E402
import serving_report as reporting  # noqa: E402
import serving_sweep as sweeps  # noqa: E402


def test_identical_popularity_uses_one_adapter():
    assert set(load.adapter_indices("identical", 50, 8, random.Random(0))) == {0}


def test_distinct_popularity_cycles_through_all_adapters():
    indices = load.adapter_indices("distinct", 32, 8, random.Random(0))
    assert indices[:8] == list(range(8))
    assert Counter(indices) == {i: 4 for i in range(8)}


def test_uniform_popularity_spreads_evenly():
    counts = Counter(load.adapter_indices("uniform", 8000, 8, random.Random(0)))
    assert set(counts) == set(range(8))
    assert all(800 < c < 1200 for c in counts.values())


def test_zipf_popularity_follows_rank():
    counts = Counter(load.adapter_indices("zipf", 20000, 16, random.Random(0)))
    shares = [counts[i] / 20000 for i in range(16)]
    expected_top = 1 / sum(1 / (k + 1) ** 1.5 for k in range(16))  # ~0.42
    assert abs(shares[0] - expected_top) < 0.02
    assert shares[0] > shares[1] > shares[3] > shares[15]


def test_unknown_popularity_is_refused():
    with pytest.raises(ValueError):
        load.adapter_indices("bursty", 4, 2, random.Random(0))


def test_poisson_arrivals_are_bounded_and_near_the_rate():
    times = load.poisson_arrivals(50.0, 20.0, 10_000, random.Random(0))
    assert times == sorted(times) and 0 < times[0] and times[-1] < 20.0
    assert 900 < len(times) < 1100
    assert len(load.poisson_arrivals(50.0, 20.0, 10, random.Random(0))) == 10


def test_workload_is_the_same_across_popularity_cases_but_the_adapters():
    spec = load.WorkloadSpec(rate=5.0, duration_s=10.0, seed=3)
    adapters = [f"a{i}" for i in range(4)]
    zipf, identical, base = (load.make_workload(spec, case, adapters) for case in ("zipf", "identical", load.BASE_ONLY))
    strip = [(r.send_at, r.prompt, r.max_tokens) for r in zipf]
    assert strip == [(r.send_at, r.prompt, r.max_tokens) for r in identical] == [(r.send_at, r.prompt, r.max_tokens) for r in base]
    assert {r.lora for r in identical} == {"a0"} and {r.lora for r in base} == {None}
    assert zipf == load.make_workload(spec, "zipf", adapters)  # seeded
    for request in zipf:
        assert 16 <= len(request.prompt.split()) <= 64 and 16 <= request.max_tokens <= 48


def _fake_run(rate: float, knee: float = 3.0) -> dict:
    p99 = 0.5 if rate <= knee else 5.0
    return {"offered_rate": rate, "errors": 0, "unfinished": 0, "ttft_s": {"p99": p99}, "tpot_s": {"p99": 0.1}}


def _holds(run: dict) -> bool:
    return sweeps.holds_bounds(run, load.Bounds(2.0, 0.5))


def test_sweep_goes_up_to_the_first_failure_and_bisects():
    runs, held = sweeps.sweep(_fake_run, [1, 2, 4, 8], holds=_holds, refine=1)
    assert [r["offered_rate"] for r in runs] == [1, 2, 4, round((2 * 4) ** 0.5, 3)]
    assert held == 2.828


def test_sweep_from_a_start_rate_goes_down_until_one_holds():
    runs, held = sweeps.sweep(_fake_run, [1, 2, 4, 8], holds=_holds, refine=0, start_rate=8)
    assert [r["offered_rate"] for r in runs] == [8, 4, 2] and held == 2
    _, nothing = sweeps.sweep(lambda rate: _fake_run(rate, knee=0.1), [1, 2], holds=_holds, refine=1)
    assert nothing == 0.0


def test_baseline_bisection_stops_once_the_goal_verdict_is_settled():
    settled = sweeps.goal_settled("peft-naive", 5.66)  # goal 5x
    runs, held = sweeps.sweep(lambda rate: _fake_run(rate, knee=0.6), [0.5, 1, 2], holds=_holds, refine=3, settled=settled)
    assert [r["offered_rate"] for r in runs] == [0.5, 1] and held == 0.5  # 5.66 / 1 >= 5: met whatever lies between
    runs, held = sweeps.sweep(lambda rate: _fake_run(rate, knee=1.5), [1, 2, 4], holds=_holds, refine=3, settled=settled)
    # 5.66 / 2 < 5 <= 5.66 / 1: open, so 1.414 is run; it holds and 5.66 / 1.414 < 5: missed whatever lies above
    assert [r["offered_rate"] for r in runs] == [1, 2, 1.414] and held == 1.414
    runs, _ = sweeps.sweep(lambda rate: _fake_run(rate, knee=1.5), [1, 2, 4], holds=_holds, refine=3)
    assert len(runs) == 5  # without `settled` all three steps
    assert sweeps.goal_settled("loraplex", 5.66) is None and sweeps.goal_settled("peft-naive", None) is None


def _run(server: str, popularity: str, rate: float | None, tok_s: float, **tags) -> dict:
    return {
        "server": server, "popularity": popularity, "offered_rate": rate, "requests": 10, "completed": 10, "errors": 0,
        "unfinished": 0, "request_throughput": tok_s / 30, "output_throughput": tok_s,
        "ttft_s": {"p50": 0.5, "p90": 0.8, "p99": 1.0}, "tpot_s": {"p50": 0.1, "p99": 0.2}, **tags,
    }


def _burst(server: str, case: str, peak_round: int, tok_s: float) -> dict:
    popularity = load.BASE_ONLY if server == "loraplex-base" else case
    return _run(server, popularity, None, tok_s, peak_round=peak_round)


def test_paired_bursts_give_the_median_of_the_ratios_within_rounds():
    runs = [
        _run("loraplex-base", "base", 8.0, 500.0),  # a sweep run, not in a round: ignored
        _burst("loraplex-base", "", 0, 100.0), _burst("loraplex", "zipf", 0, 90.0), _burst("loraplex", "uniform", 0, 80.0),
        _burst("loraplex", "zipf", 1, 96.0), _burst("loraplex-base", "", 1, 160.0),  # one fast base-only burst
        _burst("loraplex", "zipf", 2, 95.0), _burst("loraplex-base", "", 2, 100.0),
        _burst("loraplex", "uniform", 3, 70.0),  # its round has no base-only burst
    ]
    peaks = reporting.paired_peaks(runs)
    assert peaks["zipf"]["pairs"] == [
        {"loraplex": 90.0, "base": 100.0, "ratio": 0.9}, {"loraplex": 96.0, "base": 160.0, "ratio": 0.6},
        {"loraplex": 95.0, "base": 100.0, "ratio": 0.95},
    ]
    assert peaks["zipf"]["ratio"] == 0.9
    assert peaks["uniform"] == {"pairs": [{"loraplex": 80.0, "base": 100.0, "ratio": 0.8}, {"loraplex": 70.0}], "ratio": 0.8, "interval": None}
    capacities = [
        {"server": "loraplex", "popularity": case, "sustainable_rate": 4.0, "lowest_rate": 4.0,
         "peak_output_throughput": 99.0, "peak_request_throughput": 1.0}
        for case in ("zipf", "identical")
    ] + [{"server": "loraplex-base", "popularity": "base", "sustainable_rate": 4.0, "lowest_rate": 4.0,
          "peak_output_throughput": 100.0, "peak_request_throughput": 1.0}]
    zipf, identical = reporting.goal_table(capacities, ["zipf", "identical"], 8.0, peaks)
    assert zipf["loraplex_vs_base_throughput"] == 0.9 and zipf["goals_met"]["vs_base>=0.85x"]
    assert identical["loraplex_vs_base_throughput"] == 0.99  # no rounds: the sweeps' peaks
    assert " burst " in reporting.run_line(runs[1])


def test_median_interval_is_the_distribution_free_one():
    assert reporting.median_interval([0.9, 0.8, 1.0, 0.7]) is None  # 4 values: no 90 % interval exists
    five = reporting.median_interval([0.9, 0.8, 1.2, 0.7, 1.0])
    assert five == {"low": 0.7, "high": 1.2, "coverage": 1 - 2 / 32}
    eight = reporting.median_interval([float(v) for v in (5, 1, 7, 3, 8, 2, 6, 4)])
    assert (eight["low"], eight["high"]) == (2.0, 7.0)
    for n in range(5, 16):
        # Coverage by counting: the interval [k-th lowest, k-th highest] misses the median exactly when
        # fewer than k of the n draws fall on one side of it; each side has probability 1/2 per draw.
        interval = reporting.median_interval([float(v) for v in range(n)])
        k = int(interval["low"]) + 1
        patterns = list(itertools.product((0, 1), repeat=n))
        covered = sum(1 for above in patterns if k <= sum(above) <= n - k)
        assert interval["coverage"] == covered / len(patterns) >= 0.9
        wider = sum(1 for above in patterns if k + 1 <= sum(above) <= n - k - 1) / len(patterns)
        assert wider < 0.9  # k is the largest that keeps the coverage


def test_goal_table_says_whether_the_rounds_settle_the_base_goal():
    def peaks(ratios):
        return {"zipf": {"pairs": [], "ratio": statistics.median(ratios), "interval": reporting.median_interval(ratios)}}

    capacities = [{"server": "loraplex", "popularity": "zipf", "sustainable_rate": 4.0, "lowest_rate": 4.0,
                   "peak_output_throughput": 90.0, "peak_request_throughput": 1.0}]
    for ratios, settled in (([0.9, 0.86, 1.0, 0.95, 0.88], True), ([0.9, 0.8, 1.0, 0.95, 0.88], False),
                            ([0.8, 0.7, 0.84, 0.6, 0.83], True), ([0.9, 0.95], None)):
        (row,) = reporting.goal_table(capacities, ["zipf"], 8.0, peaks(ratios))
        assert row["vs_base_settled"] is settled, ratios
        assert row["goals_met"]["vs_base>=0.85x"] == (statistics.median(ratios) >= 0.85)


def test_peak_rounds_rotate_the_order(monkeypatch):
    made = []

    def fake_measure(endpoint, server, popularity, spec, *args, **kwargs):
        made.append(popularity)
        assert math.isinf(spec.rate) and spec.max_requests == 5
        return _run(server, popularity, None, 100.0)

    monkeypatch.setattr(serving, "measure", fake_measure)
    opts = serving.Options(model_dir=Path("."), servers=["loraplex", "loraplex-base"], popularity=["zipf", "identical"],
                           rates=[4, 8], peak_rounds=4, peak_requests=5, progress=False)
    runs = serving.peak_rounds(opts, None, ["a"])
    assert made == ["base", "zipf", "identical", "zipf", "identical", "base", "identical", "base", "zipf",
                    "base", "zipf", "identical"]
    assert [r["peak_round"] for r in runs] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert {case: entry["ratio"] for case, entry in reporting.paired_peaks(runs).items()} == {"zipf": 1.0, "identical": 1.0}


def test_a_burst_sends_everything_at_once():
    assert load.poisson_arrivals(math.inf, 0.0, 5, random.Random(0)) == [0.0] * 5
    burst = load.make_workload(load.WorkloadSpec(math.inf, 0.0, max_requests=6), "zipf", ["a", "b"])
    assert [r.send_at for r in burst] == [0.0] * 6 and {r.lora for r in burst} <= {"a", "b"}


def test_baseline_sweeps_start_at_the_goal_below_loraplex():
    grid = [0.125, 0.25, 0.5, 1, 2, 4, 8]
    assert sweeps.baseline_floor("peft-naive", 5.66, grid) == 1  # 5.66 / 5 = 1.13
    assert sweeps.baseline_floor("peft-batched", 5.66, grid) == 2  # 5.66 / 2 = 2.83
    assert sweeps.baseline_floor("peft-batched", 4, grid) == 2  # failing at 2: beaten by more than 2x
    assert sweeps.baseline_floor("peft-naive", 0.5, grid) == 0.125  # under the grid: its lowest
    assert sweeps.baseline_floor("peft-naive", None, grid) == 0.125  # loraplex not measured
    assert sweeps.baseline_floor("loraplex-base", 5.66, grid) == 0.125


def test_goal_table_ratios_and_their_lower_bounds():
    def cap(server, case, rate, lowest, peak=100.0):
        return {"server": server, "popularity": case, "sustainable_rate": rate, "lowest_rate": lowest,
                "peak_output_throughput": peak, "peak_request_throughput": 1.0}

    capacities = [
        cap("loraplex", "zipf", 4.0, 4.0, peak=90.0), cap("loraplex-base", "base", 4.0, 4.0),
        cap("peft-naive", "zipf", 0.0, 0.5),  # held nowhere from its floor up: true rate < 0.5
        cap("peft-batched", "zipf", 1.0, 1.0),
    ]
    (row,) = reporting.goal_table(capacities, ["zipf"], grid_top=8.0)
    assert row["loraplex_vs_naive_rate"] == 8.0 and "loraplex_vs_naive_rate" in row["lower_bounds"]
    assert row["loraplex_vs_batched_rate"] == 4.0 and "loraplex_vs_batched_rate" not in row["lower_bounds"]
    assert row["loraplex_vs_base_throughput"] == 0.9
    assert row["goals_met"] == {"vs_naive>=5x": True, "vs_batched>=2x": True, "vs_base>=0.85x": True}
    capacities[2] = cap("peft-naive", "zipf", 0.0, 1.0)  # a lower bound under the goal says nothing
    (row,) = reporting.goal_table(capacities, ["zipf"], grid_top=8.0)
    assert row["loraplex_vs_naive_rate"] == 4.0 and row["goals_met"]["vs_naive>=5x"] is None


def test_a_run_holds_only_within_both_bounds_and_without_failures():
    good = _fake_run(1.0)
    both = load.Bounds(2.0, 0.5)
    assert sweeps.holds_bounds(good, both)
    assert not sweeps.holds_bounds(good | {"tpot_s": {"p99": 0.6}}, both)
    assert sweeps.holds_bounds(good | {"tpot_s": {"p99": 0.6}}, load.Bounds(2.0))
    assert not sweeps.holds_bounds(good | {"unfinished": 1}, load.Bounds(2.0))
    assert not sweeps.holds_bounds(_fake_run(4.0), load.Bounds(2.0))


def test_p99_is_surely_over_exactly_when_numpy_says_so_whatever_the_rest():
    for n in range(1, 260):
        need = next(k for k in range(1, n + 1) if load.p99_surely_over(k, n))
        assert not load.p99_surely_over(need - 1, n)
        over = lambda k: np.percentile([0.0] * (n - k) + [1.0 + 1e-9] * k, 99)  # noqa: E731 - the rest as low as can be
        assert over(need) > 1.0 and over(need - 1) <= 1.0, n


def test_bounds_are_surely_missed_by_late_first_tokens_or_slow_streams():
    results = [load.RequestResult(sent_at=0.0, first_token_at=0.1) for _ in range(45)]  # p99 between the top two
    ttft_only = load.Bounds(1.0)
    assert not load.bounds_surely_missed(results, ttft_only, now=10.0)
    results[0].first_token_at, results[1].first_token_at = 3.0, None  # one late, one still waiting
    assert not load.bounds_surely_missed(results, ttft_only, now=0.5)
    assert load.bounds_surely_missed(results, ttft_only, now=10.0)
    results = [load.RequestResult(sent_at=0.0, first_token_at=0.1) for _ in range(45)]
    for r in results[:2]:  # done: 9 tokens, 0.25 s apart after the first
        r.first_token_at, r.done_at, r.output_tokens = 0.5, 2.5, 9
    assert not load.bounds_surely_missed(results, load.Bounds(1.0, 0.25), now=10.0)
    assert load.bounds_surely_missed(results, load.Bounds(1.0, 0.24), now=10.0)
    assert not load.bounds_surely_missed(results, load.Bounds(1.0, None), now=10.0)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    model_dir = root / "model"
    make_tiny_model("llama", model_dir)
    adapters = serving.make_adapters(model_dir, root / "adapters", count=2, rank=4)
    return root, model_dir, adapters


def test_harness_against_naive_peft_server(tiny_setup, tmp_path):
    root, model_dir, adapters = tiny_setup
    with serving.launch("peft-naive", model_dir, root / "adapters", adapters, tmp_path, max_batch=4) as endpoint:
        spec = load.WorkloadSpec(rate=4.0, duration_s=2.0, max_requests=12, prompt_words=(4, 8), max_tokens=(4, 8))
        run = serving.measure(endpoint, "peft-naive", "uniform", spec, adapters, drain_s=20.0, progress=False)
        # a TTFT bound no request can meet: the run stops at the first late request, sending no more
        slow = load.make_workload(load.WorkloadSpec(rate=1.0, duration_s=30.0, max_requests=30), "uniform", adapters)
        cut, _, _ = asyncio.run(load.run_load(endpoint, slow, drain_s=20.0, give_up=load.Bounds(1e-3)))

    unsent = [r for r in cut if r.sent_at is None]
    assert len(unsent) >= 20 and all(r.error == "unfinished" for r in unsent)
    assert run["requests"] >= 1 and run["completed"] == run["requests"]
    assert run["errors"] == 0 and run["unfinished"] == 0, run["error_samples"]
    for key in ("ttft_s", "tpot_s", "latency_s"):
        p = run[key]
        assert 0 < p["p50"] <= p["p90"] <= p["p99"], (key, p)
    assert run["request_throughput"] > 0 and run["output_throughput"] > 0
    assert 4 <= run["mean_output_tokens"] <= 8

    capacities = [sweeps.capacity("peft-naive", "uniform", [run], sustainable_rate=4.0)]
    report = {
        "config": {"ttft_bound_s": 2.0, "popularity": ["uniform"]},
        "runs": [run],
        "capacities": capacities,
        "goals": reporting.goal_table(capacities, ["uniform"], grid_top=8.0),
    }
    paths = reporting.write_report(report, tmp_path / "out")
    assert {p.name for p in paths} == {"serving.json", "serving_latency.png", "serving_throughput.png"}
    saved = json.loads((tmp_path / "out" / "serving.json").read_text())
    assert {"config", "runs", "capacities", "goals"} <= set(saved)
    assert {"server", "popularity", "offered_rate", "completed", "errors", "request_throughput", "output_throughput",
            "ttft_s", "tpot_s"} <= set(saved["runs"][0])
    assert saved["goals"][0]["popularity"] == "uniform" and saved["goals"][0]["loraplex_vs_naive_rate"] is None
