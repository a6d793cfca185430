"""Shared by the fine-tuning tests: follow a job to its end through the OpenAI SDK."""

from __future__ import annotations

import time

TERMINAL = ("succeeded", "failed", "cancelled")
# hyperparameters with which a tiny random model learns a one-word answer to a handful of prompts
MEMORISE = {"n_epochs": 12, "batch_size": 2, "learning_rate_multiplier": 50.0}


def wait_for_job(client, job_id: str, guard_s: float = 300):
    """The job once it is succeeded, failed or cancelled. `guard_s` only guards against a hang
    (a deadlock), never times the job."""
    deadline = time.monotonic() + guard_s
    while (job := client.fine_tuning.jobs.retrieve(job_id)).status not in TERMINAL:
        assert time.monotonic() < deadline, f"job {job_id} still {job.status}"
        time.sleep(0.2)
    return job
