"""Smoke test of benchmarks/finetune.py in its smallest configuration (a tiny random model, a few
examples, one-second serving windows): it runs end to end and reports every figure, never
checked for speed."""

from __future__ import annotations

import json
from pathlib import Path

from module_loading import load_module

FINETUNE_PY = Path(__file__).resolve().parent.parent / "benchmarks" / "finetune.py"


def test_the_benchmark_runs_in_a_minimal_configuration(model_dir, tmp_path):
    bench = load_module(FINETUNE_PY, "loraplex_bench_finetune")
    result = bench.main(["--model", str(model_dir), "--examples", "4", "--epochs", "1", "--load-seconds", "1",
                         "--concurrency", "1", "--max-tokens", "2", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "finetune.json").read_text()) == result
    job = result["job_a"]
    assert job["steps"] == 1 and job["trained_tokens"] > 0 and job["training_tok_s"] > 0
    assert job["time_to_served_adapter_s"] > 0 and isinstance(job["first_reply"], str)
    # the idle windows run a fixed time, so they see requests; how many fit while this one-step job
    # trains depends on the machine's speed (none, on a loaded one): only the shape is checked there
    for window in ("idle_before", "idle_after"):
        assert result[window]["requests"] >= 1 and result[window]["output_tokens"] >= 1, window
    assert result["busy"]["requests"] >= 0 and result["busy"]["output_tokens"] >= 0
    assert result["serving_busy_over_idle"] >= 0
