"""Fine-tuning on the platform: training speed, time to a served adapter, serving while training.

One `loraplex serve` subprocess (the default model, SmolLM2-135M-Instruct, float32, CPU; torch
at `--threads` threads in the server and 1 in the trainer's worker process), driven over HTTP:

1. idle serving: a closed loop of `--concurrency` greedy `/v1/completions` requests of
   `--max-tokens` tokens (base model) for `--load-seconds`; output tokens/s.
2. job A: upload `--examples` chat examples (a user question, an answer in a fixed style),
   create a job of `--epochs` epochs (defaults otherwise), poll until the job has succeeded and
   a chat request with `fine_tuned_model` answers: "time to a served adapter" is job creation →
   that first answer. Training tokens/s = the job's `trained_tokens` / the last step event's
   `elapsed_seconds` (the training loop only: model loading and publishing excluded).
3. job B (same data, another seed): once its first step is reported, the same serving loop
   runs for `--load-seconds` while it trains, then B is cancelled. Then idle serving again.
   The ratio is busy / mean(idle before, idle after), all in this one run.

    LORAPLEX_DATA_DIR=.pytest_data .venv/bin/python benchmarks/finetune.py     # default model

The smallest configuration (tests/test_finetune_bench.py) runs a tiny model with a few examples.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))  # common.py, also when this file is loaded by path

from common import create_loraplex_account, free_port, loraplex_executable, thread_env  # noqa: E402

from loraplex.client import stop_process, wait_until_healthy  # noqa: E402
from loraplex.training.jobs import TERMINAL  # noqa: E402

REPO_DIR = BENCH_DIR.parent
TOPICS = ["rivers", "stars", "bread", "trains", "music", "forests", "robots", "oceans", "cities", "clocks"]
DEADLOCK_GUARD_S = 3600.0


def dataset(examples: int) -> bytes:
    """`examples` chats: a question, and an answer in one fixed style (the base model's differs)."""
    lines = []
    for i in range(examples):
        topic = TOPICS[i % len(TOPICS)]
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": f"Tell me one fact about {topic}, number {i}."},
            {"role": "assistant", "content": f"Arr, matey! Fact {i} about {topic}: they be older than the "
                                             "sea itself, and twice as salty. Yo ho!"}]}))
    return ("\n".join(lines) + "\n").encode()


class Server:
    """`loraplex serve` on a free loopback port with its own data dir, and one account's client."""

    def __init__(self, model_dir: str, work: Path, threads: int):
        data_dir = work / "data"
        data_dir.mkdir()
        account_id, token = create_loraplex_account(data_dir)
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = work / "server.log"
        command = [loraplex_executable(), "serve", "--model", model_dir, "--data-dir", str(data_dir),
                   "--port", self.url.rsplit(":", 1)[1], "--dtype", "float32", "--log-level", "warning"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_DIR,
                                         env=thread_env(threads))
        wait_until_healthy(self.url, self.proc, 600, self.log_path)
        self.model = httpx.get(f"{self.url}/healthz").json()["model"]
        self.base = f"{self.url}/client/v4/accounts/{account_id}/ai/v1"
        self.http = httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=600)

    def call(self, method: str, path: str, **kwargs) -> dict:
        response = self.http.request(method, self.base + path, **kwargs)
        if response.status_code != 200:
            raise RuntimeError(f"{method} {path}: HTTP {response.status_code}: {response.text[:500]}")
        return response.json()

    def stop(self) -> None:
        stop_process(self.proc)


def serving_load(server: Server, seconds: float, concurrency: int, max_tokens: int,
                 until=lambda: False) -> dict:
    """Closed loop for `seconds` (or until `until()`); output tokens/s over the window."""
    tokens, requests, lock = [0], [0], threading.Lock()
    start = time.monotonic()
    end = start + seconds

    def worker(index: int) -> None:
        client = httpx.Client(headers=server.http.headers, timeout=600)
        n = 0
        while time.monotonic() < end and not until():
            body = {"model": server.model, "prompt": f"Write about {TOPICS[(index + n) % len(TOPICS)]}.",
                    "max_tokens": max_tokens, "temperature": 0}
            response = client.post(server.base + "/completions", json=body)
            response.raise_for_status()
            with lock:
                tokens[0] += response.json()["usage"]["completion_tokens"]
                requests[0] += 1
            n += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    return {"seconds": elapsed, "requests": requests[0], "output_tokens": tokens[0], "output_tok_s": tokens[0] / elapsed}


def create_job(server: Server, file_id: str, epochs: int, seed: int) -> tuple[dict, float]:
    job = server.call("POST", "/fine_tuning/jobs", json={"model": server.model, "training_file": file_id,
                                                         "seed": seed, "hyperparameters": {"n_epochs": epochs}})
    return job, time.monotonic()


def job_state(server: Server, job_id: str) -> tuple[dict, list[dict]]:
    """The job and its step events' data, oldest first."""
    job = server.call("GET", f"/fine_tuning/jobs/{job_id}")
    events = server.call("GET", f"/fine_tuning/jobs/{job_id}/events")["data"]
    return job, [e["data"] for e in reversed(events) if e["type"] == "metrics"]


def time_to_served(server: Server, file_id: str, epochs: int) -> dict:
    job, created = create_job(server, file_id, epochs, seed=0)
    deadline = created + DEADLOCK_GUARD_S
    while (job := server.call("GET", f"/fine_tuning/jobs/{job['id']}"))["status"] not in TERMINAL:
        assert time.monotonic() < deadline, "job A never ended"
        time.sleep(0.1)
    if job["status"] != "succeeded":
        raise RuntimeError(f"job A {job['status']}: {job['error']}")
    reply = server.call("POST", "/chat/completions", json={
        "model": job["fine_tuned_model"], "max_tokens": 16, "temperature": 0,
        "messages": [{"role": "user", "content": "Tell me one fact about rivers, number 0."}]})
    served_s = time.monotonic() - created
    _, steps = job_state(server, job["id"])
    train_s = steps[-1]["elapsed_seconds"]
    return {"job": job["id"], "steps": steps[-1]["total_steps"], "trained_tokens": job["trained_tokens"],
            "training_loop_s": train_s, "training_tok_s": job["trained_tokens"] / train_s,
            "time_to_served_adapter_s": served_s, "final_loss": steps[-1]["train_loss"],
            "first_reply": reply["choices"][0]["message"]["content"]}


def serving_while_training(server: Server, file_id: str, epochs: int, args) -> dict:
    job, _ = create_job(server, file_id, epochs, seed=1)
    deadline = time.monotonic() + DEADLOCK_GUARD_S
    while not (state := job_state(server, job["id"]))[1] and state[0]["status"] not in TERMINAL:
        assert time.monotonic() < deadline, "job B never started"
        time.sleep(0.1)
    stopped = threading.Event()

    def watch() -> None:  # the window ends early if job B does (a configuration too small to fill it)
        while not stopped.is_set():
            if server.call("GET", f"/fine_tuning/jobs/{job['id']}")["status"] != "running":
                stopped.set()
            stopped.wait(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    busy = serving_load(server, args.load_seconds, args.concurrency, args.max_tokens, until=stopped.is_set)
    trained_whole_window = not stopped.is_set()
    stopped.set()
    watcher.join()
    if server.call("GET", f"/fine_tuning/jobs/{job['id']}")["status"] not in TERMINAL:
        server.call("POST", f"/fine_tuning/jobs/{job['id']}/cancel")
    return busy | {"job": job["id"], "trained_whole_window": trained_whole_window}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help='a Hugging Face folder, or "default"')
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--load-seconds", type=float, default=30.0, help="each serving window")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight in the serving loop")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the server (the trainer uses 1)")
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args(argv)
    model_dir = args.model
    if model_dir == "default":
        from loraplex.env import data_dir
        from loraplex.models.default_model import ensure_default_model

        model_dir = str(ensure_default_model(data_dir()))
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(model_dir, Path(tmp), args.threads)
        try:
            serving_load(server, min(args.load_seconds, 5.0), args.concurrency, args.max_tokens)  # warm-up
            file_id = server.call("POST", "/files", data={"purpose": "fine-tune"},
                                  files={"file": ("train.jsonl", dataset(args.examples))})["id"]
            idle_before = serving_load(server, args.load_seconds, args.concurrency, args.max_tokens)
            print(f"idle serving: {idle_before['output_tok_s']:.1f} output tok/s", flush=True)
            job_a = time_to_served(server, file_id, args.epochs)
            print(f"job A: {job_a['trained_tokens']} tokens in {job_a['training_loop_s']:.1f} s of training "
                  f"({job_a['training_tok_s']:.1f} tok/s), served {job_a['time_to_served_adapter_s']:.1f} s "
                  f"after creation; it answers {job_a['first_reply']!r}", flush=True)
            busy = serving_while_training(server, file_id, args.epochs, args)
            idle_after = serving_load(server, args.load_seconds, args.concurrency, args.max_tokens)
        finally:
            server.stop()
    idle = (idle_before["output_tok_s"] + idle_after["output_tok_s"]) / 2
    result = {"meta": {"model": model_dir, "examples": args.examples, "epochs": args.epochs,
                       "load_seconds": args.load_seconds, "concurrency": args.concurrency,
                       "max_tokens": args.max_tokens, "server_threads": args.threads, "trainer_threads": 1},
              "job_a": job_a, "idle_before": idle_before, "busy": busy, "idle_after": idle_after,
              "serving_busy_over_idle": busy["output_tok_s"] / idle}
    print(f"serving while training: {busy['output_tok_s']:.1f} output tok/s vs idle {idle:.1f} "
          f"(before {idle_before['output_tok_s']:.1f}, after {idle_after['output_tok_s']:.1f}): "
          f"ratio {result['serving_busy_over_idle']:.2f}"
          + ("" if busy["trained_whole_window"] else " (job B ended before the window did)"), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'finetune.json'}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
