"""JobStore: fine-tuning jobs (OpenAI's states and events) in `<data_dir>/training.sqlite`.

States: validating_files → queued → running → succeeded | failed | cancelled (the last three are
terminal). Contracts:
- Every method taking an account answers `NotFound` for another account's job, as for a missing one.
- `claim_next()` moves one queued job to running, fairly across accounts: the account whose
  last job started longest ago (or never) goes first; within an account, the oldest job.
- `cancel` of a terminal job raises `InvalidInput`; of a queued/running one marks it cancelled
  (the worker owning a running job sees it through `status` and stops).
- The rule between cancel and success: a job is `succeeded` only through `finish(...,
  "succeeded")`, which changes nothing once the job is cancelled. A cancel that lands after the
  trainer published the finetune but before that `finish` wins: the job stays `cancelled` and the
  worker deletes the finetune it published (runner.py), so a cancelled job never leaves a finetune.
  A cancel after `succeeded` is refused ("already succeeded") and the finetune stays.
- `trained_tokens` is set when a job succeeds (the tokens of every example seen, summed over
  epochs), else null. `checkpoints` answers the final checkpoint of a succeeded job (its served
  finetune, the last step's metrics), none otherwise.
- `fail_interrupted()` (call once at start-up) marks jobs left `running` by a dead process failed,
  so none stays stuck in `running`.
- A status change (`mark_queued`, `finish`, `cancel`, `fail_interrupted`) writes its event ("the
  job was queued", "the job has succeeded: NAME", …) in the same transaction: a reader who sees
  the status sees the event.
Each call opens its own SQLite connection; a lock serialises writers. Blocking: use worker threads.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from loraplex.errors import InvalidInput, NotFound

TERMINAL = ("succeeded", "failed", "cancelled")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY, account TEXT NOT NULL, model TEXT NOT NULL, training_file TEXT NOT NULL,
        validation_file TEXT, suffix TEXT, seed INTEGER NOT NULL, hyperparameters TEXT NOT NULL,
        status TEXT NOT NULL, created_at INTEGER NOT NULL, started_at REAL, finished_at INTEGER,
        fine_tuned_model TEXT, error TEXT, trained_tokens INTEGER)""",
    """CREATE TABLE IF NOT EXISTS job_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, job TEXT NOT NULL, created_at INTEGER NOT NULL,
        level TEXT NOT NULL, message TEXT NOT NULL, data TEXT)""",
)


@dataclass(frozen=True)
class Job:
    id: str
    account: str
    model: str
    training_file: str
    validation_file: str | None
    suffix: str | None
    seed: int
    hyperparameters: dict
    status: str
    created_at: int
    started_at: float | None
    finished_at: int | None
    fine_tuned_model: str | None
    error: str | None
    trained_tokens: int | None


def _job(row) -> Job:
    values = list(row)
    values[7] = json.loads(values[7])
    return Job(*values)


class JobStore:
    def __init__(self, data_dir: Path):
        data_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = data_dir / "training.sqlite"
        self._lock = threading.Lock()
        with self._connect() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
            if "trained_tokens" not in columns:  # a data dir from before trained_tokens
                conn.execute("ALTER TABLE jobs ADD COLUMN trained_tokens INTEGER")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.db_path, timeout=30)

    def create(self, account: str, model: str, training_file: str, hyperparameters: dict, *,
               validation_file: str | None = None, suffix: str | None = None, seed: int = 0) -> Job:
        job_id = f"ftjob-{uuid.uuid4().hex}"
        with self._lock, self._connect() as conn:
            conn.execute("INSERT INTO jobs VALUES (?,?,?,?,?,?,?,?,?,?,NULL,NULL,NULL,NULL,NULL)",
                         (job_id, account, model, training_file, validation_file, suffix, seed,
                          json.dumps(hyperparameters), "validating_files", int(time.time())))
        return self.get(account, job_id)

    def get(self, account: str, job_id: str) -> Job:
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE account=? AND id=?", (account, job_id)).fetchone()
        if row is None:
            raise NotFound(f"no fine-tuning job {job_id!r}")
        return _job(row)

    def list(self, account: str) -> list[Job]:
        with self._connect() as conn:
            rows = conn.execute("SELECT * FROM jobs WHERE account=? ORDER BY created_at DESC, rowid DESC",
                                (account,)).fetchall()
        return [_job(r) for r in rows]

    def _set(self, job_id: str, only_from: tuple[str, ...], event: str | None = None, **fields) -> bool:
        """Update `fields` if the job's status is in `only_from`, adding `event` (a message) in the
        same transaction; True when it changed."""
        names = ", ".join(f"{k}=?" for k in fields)
        marks = ",".join("?" * len(only_from))
        with self._lock, self._connect() as conn:
            cur = conn.execute(f"UPDATE jobs SET {names} WHERE id=? AND status IN ({marks})",
                               (*fields.values(), job_id, *only_from))
            if cur.rowcount == 1 and event is not None:
                conn.execute("INSERT INTO job_events (job, created_at, level, message) VALUES (?,?,?,?)",
                             (job_id, int(time.time()), "error" if fields.get("status") == "failed" else "info", event))
            return cur.rowcount == 1

    def mark_queued(self, job_id: str) -> bool:
        return self._set(job_id, ("validating_files",), "the job was queued", status="queued")

    def claim_next(self) -> Job | None:
        with self._lock, self._connect() as conn:
            row = conn.execute(
                """SELECT j.id, j.account FROM jobs j WHERE j.status='queued' ORDER BY
                   (SELECT COALESCE(MAX(started_at), 0) FROM jobs k WHERE k.account=j.account), j.rowid
                   LIMIT 1""").fetchone()
            if row is None:
                return None
            conn.execute("UPDATE jobs SET status='running', started_at=? WHERE id=?", (time.time(), row[0]))
        return self.get(row[1], row[0])

    def finish(self, job_id: str, status: str, *, fine_tuned_model: str | None = None,
               error: str | None = None, trained_tokens: int | None = None) -> bool:
        """Move a job that is not terminal yet to `status`, with its last event ("the job has
        succeeded: NAME", "the job failed: ERROR", "the job was cancelled") in the same
        transaction, so whoever sees the status also sees that event; False (nothing changed)
        when it already is terminal, e.g. cancelled meanwhile."""
        assert status in TERMINAL
        event = {"succeeded": f"the job has succeeded: {fine_tuned_model}", "failed": f"the job failed: {error}",
                 "cancelled": "the job was cancelled"}[status]
        return self._set(job_id, ("validating_files", "queued", "running"), event, status=status,
                         finished_at=int(time.time()), fine_tuned_model=fine_tuned_model, error=error,
                         trained_tokens=trained_tokens)

    def cancel(self, account: str, job_id: str) -> Job:
        job = self.get(account, job_id)
        if job.status in TERMINAL or not self.finish(job.id, "cancelled"):
            raise InvalidInput(f"job {job_id} has already {self.get(account, job_id).status}; it cannot be cancelled")
        return self.get(account, job_id)

    def fail_interrupted(self) -> int:
        with self._connect() as conn:
            running = [row[0] for row in conn.execute("SELECT id FROM jobs WHERE status='running'")]
        return sum(self.finish(job_id, "failed", error="the server restarted while the job ran") for job_id in running)

    def add_event(self, job_id: str, message: str, data: dict | None = None, level: str = "info") -> None:
        with self._lock, self._connect() as conn:
            conn.execute("INSERT INTO job_events (job, created_at, level, message, data) VALUES (?,?,?,?,?)",
                         (job_id, int(time.time()), level, message, json.dumps(data) if data else None))

    def events(self, account: str, job_id: str) -> list[dict]:
        self.get(account, job_id)
        with self._connect() as conn:
            rows = conn.execute("SELECT seq, created_at, level, message, data FROM job_events WHERE job=? "
                                "ORDER BY seq", (job_id,)).fetchall()
        return [{"seq": s, "created_at": t, "level": lv, "message": m, "data": json.loads(d) if d else None}
                for s, t, lv, m, d in rows]

    def checkpoints(self, account: str, job_id: str) -> list[dict]:
        """The final checkpoint of a succeeded job: `fine_tuned_model`, `step`, `created_at` and
        `metrics` (the last step's event data); [] for a job that did not succeed."""
        job = self.get(account, job_id)
        if job.status != "succeeded":
            return []
        steps = [e["data"] for e in self.events(account, job_id) if e["data"] and "step" in e["data"]]
        metrics = steps[-1] if steps else {}
        return [{"fine_tuned_model": job.fine_tuned_model, "step": metrics.get("step", 0),
                 "created_at": job.finished_at, "metrics": metrics}]
