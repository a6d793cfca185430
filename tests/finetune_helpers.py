"""Shared by the fine-tuning tests: follow a job to its end through the OpenAI SDK."""

from __future__ import annotations

import json
import time

TERMINAL = ("succeeded", "failed", "cancelled")
# hyperparameters with which a tiny random model learns a one-word answer to a handful of prompts
MEMORISE = {"n_epochs": 12, "batch_size": 2, "learning_rate_multiplier": 50.0}
MEMORISE_PROMPTS = [f"say {w}" for w in ("one", "two", "three", "four")]  # each answered "ARR"
ONE_EXAMPLE_DATA = (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ARR"}]})
                    + "\n").encode()  # the smallest valid fine-tuning file: one chat
MEMORISE_DATA = "".join(json.dumps({"messages": [{"role": "user", "content": p},
                                                  {"role": "assistant", "content": "ARR"}]}) + "\n"
                        for p in MEMORISE_PROMPTS).encode()


def wait_for_job(client, job_id: str, guard_s: float = 300):
    """The job once it is succeeded, failed or cancelled. `guard_s` only guards against a hang
    (a deadlock), never times the job."""
    deadline = time.monotonic() + guard_s
    while (job := client.fine_tuning.jobs.retrieve(job_id)).status not in TERMINAL:
        assert time.monotonic() < deadline, f"job {job_id} still {job.status}"
        time.sleep(0.2)
    return job
