"""`loraplex jobs create|list|get|cancel|events`: fine-tuning jobs from the command line (client
commands, like `loraplex finetunes …`: `--url`, LORAPLEX_ACCOUNT_ID, LORAPLEX_API_TOKEN).

Output: one JSON object per line (a job, or an event, oldest first). `events --follow` polls the
server until the job ends: on a terminal it redraws one progress line (steps done/total, loss,
ETA, status); otherwise it prints each new event as a JSON line. It exits 0 when the job
succeeded, 1 (with `error: …` on stderr) when it failed or was cancelled.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from loraplex import config
from loraplex.training.jobs import TERMINAL

BAR_WIDTH = 30


def add_parser(sub, url: argparse.ArgumentParser) -> None:
    jobs = sub.add_parser("jobs", help="fine-tuning jobs: train a LoRA on the server from a chat JSONL (client)")
    jobs_sub = jobs.add_subparsers(dest="action", required=True)
    create = jobs_sub.add_parser("create", parents=[url], help="upload the training file (or name a file id) "
                                                               "and start a job; prints the job")
    create.add_argument("training_file", help="a chat-format JSONL to upload, or the id (file-…) of one uploaded")
    create.add_argument("--model", required=True, help="the served base model")
    create.add_argument("--suffix", default=None, help="part of the finetune's name (BASE:SUFFIX-…)")
    create.add_argument("--seed", type=int, default=None)
    create.add_argument("--epochs", type=int, default=None, dest="n_epochs", metavar="N")
    create.add_argument("--batch-size", type=int, default=None)
    create.add_argument("--learning-rate-multiplier", type=float, default=None)
    create.add_argument("--rank", type=int, default=None, help="LoRA rank")
    create.add_argument("--alpha", type=int, default=None, help="LoRA alpha")
    create.add_argument("--target-modules", default=None, help="comma-separated, e.g. q_proj,v_proj")
    jobs_sub.add_parser("list", parents=[url], help="one JSON line per job, newest first")
    for action, what in (("get", "one job (JSON)"), ("cancel", "cancel a queued or running job")):
        command = jobs_sub.add_parser(action, parents=[url], help=what)
        command.add_argument("job_id")
    events = jobs_sub.add_parser("events", parents=[url], help="a job's events, oldest first (JSON lines)")
    events.add_argument("job_id")
    events.add_argument("--follow", action="store_true",
                        help="until the job ends: a progress bar on a terminal, JSON lines otherwise")
    events.add_argument("--poll-interval", type=float, default=config.DEFAULT_JOB_POLL_S, metavar="SECONDS",
                        help=f"with --follow (default {config.DEFAULT_JOB_POLL_S:g})")


def run(args: argparse.Namespace, client) -> int:
    from loraplex.client import print_json

    if args.action == "create":
        print_json(client.create_job(create_body(args, client)))
    elif args.action == "list":
        for job in client.list_jobs():
            print_json(job)
    elif args.action == "get":
        print_json(client.get_job(args.job_id))
    elif args.action == "cancel":
        print_json(client.cancel_job(args.job_id))
    elif args.follow:
        return follow(client, args.job_id, args.poll_interval, sys.stdout)
    else:
        for event in client.job_events(args.job_id):
            print_json(event)
    return 0


def create_body(args: argparse.Namespace, client) -> dict:
    """The create body; a training file that is a local path is uploaded first (a `file-…` that
    is no local path is taken as a file id)."""
    path = Path(args.training_file)
    if path.is_file():
        training_file = client.upload_training_file(path)["id"]
    elif args.training_file.startswith("file-"):
        training_file = args.training_file
    else:
        raise FileNotFoundError(f"{args.training_file}: no such file (give a JSONL path or a file id, file-…)")
    hp = {name: getattr(args, name) for name in ("n_epochs", "batch_size", "learning_rate_multiplier", "rank", "alpha")}
    if args.target_modules is not None:
        hp["target_modules"] = [m.strip() for m in args.target_modules.split(",") if m.strip()]
    body = {"model": args.model, "training_file": training_file,
            "hyperparameters": {k: v for k, v in hp.items() if v is not None}}
    return body | {k: v for k, v in (("suffix", args.suffix), ("seed", args.seed)) if v is not None}


def follow(client, job_id: str, poll_s: float, out) -> int:
    """Poll until the job ends (the job first, then its events: the event that ends a job is
    written with its status, so it is never missed)."""
    tty, seen, metrics, drawn = out.isatty(), set(), None, ""
    while True:
        job = client.get_job(job_id)
        for event in client.job_events(job_id):
            if event["id"] in seen:
                continue
            seen.add(event["id"])
            if event["type"] == "metrics":
                metrics = event["data"]
            if not tty:
                out.write(json.dumps(event) + "\n")
        if tty and (line := progress_line(job, metrics)) != drawn:
            out.write("\r" + line + "\x1b[K")
            drawn = line
        out.flush()
        if job["status"] in TERMINAL:
            break
        time.sleep(poll_s)
    if tty:
        out.write("\n")
        out.flush()
    if job["status"] == "succeeded":
        if tty:
            out.write(f"fine_tuned_model: {job['fine_tuned_model']}\n")
        return 0
    if job["status"] == "cancelled":
        print(f"error: job {job_id} was cancelled", file=sys.stderr)
    else:
        print(f"error: job {job_id} failed: {(job.get('error') or {}).get('message')}", file=sys.stderr)
    return 1


def progress_line(job: dict, metrics: dict | None) -> str:
    """`[#####-----] 12/40 steps  loss 1.2345  ETA 0:31  running` (no metrics yet: the status only)."""
    if metrics is None:
        return f"{job['id']}: {job['status']}"
    done, total = metrics["step"], metrics["total_steps"]
    filled = BAR_WIDTH * done // total
    eta = 0 if job["status"] in TERMINAL else round(metrics["eta_seconds"])
    return (f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {done}/{total} steps  loss {metrics['train_loss']:.4f}  "
            f"ETA {eta // 60}:{eta % 60:02d}  {job['status']}")
