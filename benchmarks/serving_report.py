"""The serving benchmark's results (`benchmarks/serving.py`): the goal table (ratios per popularity
case, from the sweeps and the paired bursts), the printed summary, serving.json and the PNG plots."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from serving_load import BASE_ONLY
from serving_sweep import BASELINE_GOALS

SERVERS = ["loraplex", "loraplex-base", "peft-batched", "peft-naive"]


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


GOALS = {  # goal name: (ratio key, minimum)
    "vs_naive>=5x": ("loraplex_vs_naive_rate", BASELINE_GOALS["peft-naive"]),
    "vs_batched>=2x": ("loraplex_vs_batched_rate", BASELINE_GOALS["peft-batched"]),
    "vs_base>=0.85x": ("loraplex_vs_base_throughput", 0.85),
}


def paired_peaks(runs: list[dict]) -> dict[str, dict]:
    """Per popularity case, from the bursts of `peak_rounds` in serving.py: per round, loraplex's
    output tokens/s on the case, base-only's in the same round, and their ratio; the median of the
    ratios, the case's loraplex / base-only throughput; and a 90 % interval for that median
    (`median_interval`; None under 5 rounds), which says how far the rounds pin it down. Pairing
    within a round keeps the machine's slow drift out of each ratio (the order rotates, so what is
    left of it favours neither side); the median keeps out a round that one sudden change hit. A
    round without a base-only burst gives no ratio."""
    rounds: dict[int, dict[str, float]] = {}
    for run in runs:
        if "peak_round" in run:
            rounds.setdefault(run["peak_round"], {})[run["popularity"]] = run["output_throughput"]
    peaks: dict[str, dict] = {}
    for peak_round in sorted(rounds):
        by_case = dict(rounds[peak_round])
        base = by_case.pop(BASE_ONLY, None)
        for case, tok_s in by_case.items():
            pair = {"loraplex": tok_s} | ({"base": base, "ratio": tok_s / base} if base else {})
            peaks.setdefault(case, {"pairs": []})["pairs"].append(pair)
    for entry in peaks.values():
        ratios = [pair["ratio"] for pair in entry["pairs"] if "ratio" in pair]
        entry["ratio"] = statistics.median(ratios) if ratios else None
        entry["interval"] = median_interval(ratios)
    return peaks


def median_interval(values: list[float], confidence: float = 0.9) -> dict | None:
    """A distribution-free confidence interval for the median of what `values` sample (independent
    draws, no shape assumed): the k-th lowest and k-th highest value, with k the largest for which
    P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2. Its coverage, 1 - 2 P(Binomial(n, 1/2) < k), is at
    least `confidence`. None when there are too few values for any such interval (under 5 at 90 %).
    Returns {"low", "high", "coverage"}."""
    n = len(values)

    def below(k: int) -> float:  # P(Binomial(n, 1/2) < k)
        return sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 0
    while k < n // 2 and below(k + 1) <= (1 - confidence) / 2:
        k += 1
    if k == 0:
        return None
    ordered = sorted(values)
    return {"low": ordered[k - 1], "high": ordered[n - k], "coverage": 1 - 2 * below(k)}


def settles(interval: dict | None, goal: float) -> bool | None:
    """Whether `interval` (from `median_interval`) lies wholly on one side of `goal`; None without one."""
    return None if interval is None else not interval["low"] < goal <= interval["high"]


def goal_table(
    capacities: list[dict], popularity_cases: list[str], grid_top: float, peaks: dict[str, dict] | None = None
) -> list[dict]:
    """Per popularity case: loraplex's sustainable rate against each baseline's, its throughput
    against base-only's, and whether each goal is met (None where a side was not measured).
    `lower_bounds` names the ratios that are only lower bounds (see `rate_ratio`). The throughput
    ratio comes from `peaks` (`paired_peaks`) where the case has pairs, else from the sweeps' peaks;
    with pairs, `vs_base_settled` says whether the median's interval lies wholly on one side of the
    goal (None without an interval), i.e. whether the rounds decide the verdict or only lean."""
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
        interval = None
        if peaks and case in peaks:
            row["loraplex_vs_base_throughput"], interval = peaks[case]["ratio"], peaks[case]["interval"]
        else:
            row["loraplex_vs_base_throughput"] = ratio(
                get("loraplex", case, "peak_output_throughput"), get("loraplex-base", BASE_ONLY, "peak_output_throughput")
            )
        row["lower_bounds"] = lower_bounds
        row["loraplex_vs_base_interval"] = interval
        row["vs_base_settled"] = settles(interval, GOALS["vs_base>=0.85x"][1])
        row["goals_met"] = {
            goal: None if row[key] is None or (row[key] < minimum and key in lower_bounds) else row[key] >= minimum
            for goal, (key, minimum) in GOALS.items()
        }
        rows.append(row)
    return rows


def _fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def run_line(run: dict) -> str:
    ttft, tpot = run["ttft_s"], run["tpot_s"]
    rate = "burst" if run["offered_rate"] is None else f"{run['offered_rate']:.3g}"
    return (
        f"{run['server']:<14} {run['popularity']:<9} {rate:>6} {run['completed']:>4}/{run['requests']:<4}"
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


def interval_text(interval: dict | None) -> str:
    if interval is None:
        return "(too few rounds for an interval)"
    settled = settles(interval, GOALS["vs_base>=0.85x"][1])
    return (f"{interval['coverage']:.0%} interval {interval['low']:.2f}-{interval['high']:.2f}"
            f" ({'settled' if settled else 'not settled'})")


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
    if report.get("peaks"):
        print("\npaired bursts: output tok/s, loraplex / base-only in the same round = ratio, per round; their median")
        print("and a distribution-free interval for it (settled: wholly on one side of the goal)")
        for case, entry in report["peaks"].items():
            pairs = "  ".join(f"{p.get('loraplex', 0):.1f}/{p.get('base', 0):.1f} = {_fmt(p.get('ratio'))}" for p in entry["pairs"])
            print(f"{case:<9} {pairs}  median {_fmt(entry['ratio'], 2, 'x')}  {interval_text(entry.get('interval'))}")
    if report.get("seconds"):
        print("\ntime: " + ", ".join(f"{phase} {value:.0f} s" for phase, value in report["seconds"].items()))
    print("(lp: loraplex; '+': held at the top of the grid, so at least this rate;")
    print(" '>': a lower bound, as the baseline held at no rate it was run at, or loraplex held at the top)")


def plot(report: dict, out: Path) -> list[Path]:
    """serving_latency.png (p99 TTFT against offered rate, one panel per popularity case) and
    serving_throughput.png (per popularity case: sustainable rate, the sweeps' peak output tokens/s,
    and the paired bursts' loraplex / base-only ratios)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullLocator

    runs, bound = [r for r in report["runs"] if r["offered_rate"] is not None], report["config"]["ttft_bound_s"]
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
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.4))
    width = 0.8 / max(1, len(servers))
    for k, server in enumerate(servers):
        entries = [caps.get((server, BASE_ONLY if server == "loraplex-base" else case)) for case in cases]
        xs = [i + width * (k - (len(servers) - 1) / 2) for i in range(len(cases))]
        for ax, key in zip(axes, ["sustainable_rate", "peak_output_throughput"]):
            ax.bar(xs, [e[key] if e else 0 for e in entries], width=width, label=server)
    peaks, top = report.get("peaks", {}), 1.3
    for i, case in enumerate(cases):
        entry = peaks.get(case, {"pairs": [], "ratio": None})
        axes[2].bar(i, entry["ratio"] or 0, width=0.5, color="tab:blue")
        ratios = [pair["ratio"] for pair in entry["pairs"] if "ratio" in pair]
        axes[2].plot([i] * len(ratios), ratios, "o", color="black", markersize=4)
        if entry.get("interval"):
            axes[2].vlines(i + 0.3, entry["interval"]["low"], entry["interval"]["high"], color="tab:red")
        top = max([top, *(r + 0.05 for r in ratios)])
    axes[2].axhline(GOALS["vs_base>=0.85x"][1], color="grey", linewidth=0.8, linestyle=":")
    axes[2].set_ylim(0, top)
    axes[2].set_title("loraplex / base-only, bursts: median (bar), rounds (dots), interval (red)", fontsize=9)
    for ax, label in zip(axes, ["sustainable req/s", "peak output tokens/s (sweeps)", "output tokens/s ratio"]):
        ax.set_xticks(range(len(cases)), cases)
        ax.set_ylabel(label)
    axes[0].set_ylim(top=axes[0].get_ylim()[1] * 1.35)  # room for the legend above the bars
    axes[0].legend(fontsize=7, ncol=2, loc="upper center")
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
