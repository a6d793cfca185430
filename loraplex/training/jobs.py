"""JobStore: fine-tuning jobs (OpenAI's states and events) in the training database
(training/database.py), shared by every server using it: a job created through one server is
listed, cancelled and trained through any.

States: validating_files → queued → running → succeeded | failed | cancelled (the last three are
terminal). Contracts:
- Every method taking an account answers `NotFound` for another account's job, as for a missing one.
- Claim: `claim_next(trainer)` moves one queued job to running for `trainer` (an id unique to
  one runner in one process, `new_trainer_id()`), in one write transaction that locks the row it
  takes (PostgreSQL: `SELECT … FOR UPDATE SKIP LOCKED`, so concurrent claimers in any process take
  different jobs; SQLite: `BEGIN IMMEDIATE`, claims take turns): a job is claimed by exactly one
  trainer. Fair across accounts: the account whose last job started longest ago (or never) goes
  first; within an account, the oldest job.
- Lease: a claimed job records its trainer and `lease_until` = now + `lease_s` (by `clock`,
  replaceable in tests). The trainer renews it (`renew`, every `lease_s / 3`) while it works.
  The rule: a running job whose lease has passed has lost its trainer (the process died, or
  cannot reach the database); `fail_abandoned()` fails such jobs and only those, and may be
  called by anyone at any time (each server's trainer calls it at start-up and while idle). So a
  server starting never fails a job another live server is running, and no job stays `running`
  longer than about one lease after its trainer died. A trainer whose `renew` answers False has
  lost the job (cancelled, or failed as abandoned) and stops touching it. Leases are measured on
  each server's own clock: servers sharing a database must keep their clocks (NTP) within a small
  fraction of `lease_s` of each other.
- Cancel: `cancel` of a terminal job raises `InvalidInput`; of a queued/running one marks it
  cancelled, from any server; the trainer running it sees that through `status`/`renew` (it polls)
  and stops.
- The rule between cancel and success: a job is `succeeded` only through `finish(...,
  "succeeded")`, which changes nothing once the job is terminal. A cancel that lands after the
  trainer published the finetune but before that `finish` wins: the job stays `cancelled` and the
  worker deletes the finetune it published (runner.py), so a cancelled job never leaves a finetune.
  A cancel after `succeeded` is refused ("already succeeded") and the finetune stays.
- `trained_tokens` is set when a job succeeds (the tokens of every example seen, summed over
  epochs), else null. `checkpoints` answers the final checkpoint of a succeeded job (its served
  finetune, the last step's metrics), none otherwise.
- A status change (`mark_queued`, `finish`, `cancel`, `fail_abandoned`) writes its event ("the
  job was queued", "the job has succeeded: NAME", …) in the same transaction: a reader who sees
  the status sees the event.
Thread-safe (one database connection per thread). Blocking: use worker threads.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from loraplex.adapters.registry_sql import Connection, SqlDatabase
from loraplex.config import DEFAULT_TRAINER_LEASE_S
from loraplex.errors import InvalidInput, NotFound

TERMINAL = ("succeeded", "failed", "cancelled")
ABANDONED = "its trainer stopped (the server running it exited or lost the database)"

_COLUMNS = ("id, account, model, training_file, validation_file, suffix, seed, hyperparameters, status, created_at, "
            "started_at, finished_at, fine_tuned_model, error, trained_tokens")


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


def new_trainer_id() -> str:
    """An id for one trainer: the host, the process and a random part (unique per runner)."""
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class JobStore:
    def __init__(self, db: SqlDatabase, *, lease_s: float = DEFAULT_TRAINER_LEASE_S,
                 clock: Callable[[], float] = time.time):
        if not lease_s > 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s!r}")
        self.db, self.lease_s, self.clock = db, lease_s, clock

    def create(self, account: str, model: str, training_file: str, hyperparameters: dict, *,
               validation_file: str | None = None, suffix: str | None = None, seed: int = 0) -> Job:
        job_id = f"ftjob-{uuid.uuid4().hex}"
        with self.db.write() as conn:
            conn.execute(f"INSERT INTO training_jobs ({_COLUMNS}) "
                         "VALUES (?,?,?,?,?,?,?,?,?,?,NULL,NULL,NULL,NULL,NULL)",
                         (job_id, account, model, training_file, validation_file, suffix, seed,
                          json.dumps(hyperparameters), "validating_files", int(self.clock())))
        return self.get(account, job_id)

    def get(self, account: str, job_id: str) -> Job:
        with self.db.read() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM training_jobs WHERE account=? AND id=?",
                               (account, job_id)).fetchone()
        if row is None:
            raise NotFound(f"no fine-tuning job {str(job_id)[:100]!r}")
        return _job(row)

    def list(self, account: str) -> list[Job]:
        with self.db.read() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM training_jobs WHERE account=? "
                                "ORDER BY created_at DESC, seq DESC", (account,)).fetchall()
        return [_job(r) for r in rows]

    def _event(self, conn: Connection, job_id: str, message: str, data: dict | None = None,
               level: str = "info") -> None:
        conn.execute("INSERT INTO training_job_events (job, created_at, level, message, data) VALUES (?,?,?,?,?)",
                     (job_id, int(self.clock()), level, message, json.dumps(data) if data else None))

    def _set(self, job_id: str, only_from: tuple[str, ...], event: str | None = None, **fields) -> bool:
        """Update `fields` if the job's status is in `only_from`, adding `event` (a message) in the
        same transaction; True when it changed."""
        names = ", ".join(f"{k}=?" for k in fields)
        marks = ",".join("?" * len(only_from))
        with self.db.write() as conn:
            cur = conn.execute(f"UPDATE training_jobs SET {names} WHERE id=? AND status IN ({marks})",
                               (*fields.values(), job_id, *only_from))
            changed = cur.rowcount == 1
            if changed and event is not None:
                self._event(conn, job_id, event, level="error" if fields.get("status") == "failed" else "info")
            return changed

    def mark_queued(self, job_id: str) -> bool:
        return self._set(job_id, ("validating_files",), "the job was queued", status="queued")

    def claim_next(self, trainer: str) -> Job | None:
        """The next queued job (fair order, see the module docstring), now running for `trainer`
        with a fresh lease; None when nothing is queued."""
        with self.db.read() as conn:  # the common case, nothing queued, takes no write lock
            if conn.execute("SELECT 1 FROM training_jobs WHERE status='queued' LIMIT 1").fetchone() is None:
                return None
        now = self.clock()
        with self.db.write() as conn:
            row = conn.execute(
                """SELECT j.id, j.account FROM training_jobs j WHERE j.status='queued' ORDER BY
                   (SELECT COALESCE(MAX(k.started_at), 0) FROM training_jobs k WHERE k.account=j.account), j.seq
                   LIMIT 1""" + self.db.backend.SKIP_LOCKED).fetchone()
            if row is None:
                return None
            if conn.execute("UPDATE training_jobs SET status='running', started_at=?, trainer=?, lease_until=? "
                            "WHERE id=? AND status='queued'", (now, trainer, now + self.lease_s, row[0])).rowcount != 1:
                return None  # (not reached: the row is locked and queued) the caller polls again
        return self.get(row[1], row[0])

    def renew(self, job_id: str, trainer: str) -> bool:
        """Extend `trainer`'s lease on its running job; False when the job is no longer running
        for it (cancelled, failed as abandoned, finished): the trainer lets go of it."""
        now = self.clock()
        with self.db.write() as conn:
            return conn.execute("UPDATE training_jobs SET lease_until=? WHERE id=? AND trainer=? AND status='running'",
                                (now + self.lease_s, job_id, trainer)).rowcount == 1

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
                         finished_at=int(self.clock()), fine_tuned_model=fine_tuned_model, error=error,
                         trained_tokens=trained_tokens)

    def cancel(self, account: str, job_id: str) -> Job:
        job = self.get(account, job_id)
        if job.status in TERMINAL or not self.finish(job.id, "cancelled"):
            raise InvalidInput(f"job {job_id} has already {self.get(account, job_id).status}; it cannot be cancelled")
        return self.get(account, job_id)

    def fail_abandoned(self) -> int:
        """Fail every running job whose lease has passed (its trainer is gone); how many. Safe to
        call from any server at any time: a job whose trainer renews its lease is never touched."""
        now = self.clock()
        with self.db.read() as conn:  # the common case, none, takes no write lock
            expired = [r[0] for r in conn.execute(
                "SELECT id FROM training_jobs WHERE status='running' AND lease_until < ?", (now,))]
        failed = 0
        for job_id in expired:
            with self.db.write() as conn:
                cur = conn.execute(
                    "UPDATE training_jobs SET status='failed', finished_at=?, error=? "
                    "WHERE id=? AND status='running' AND lease_until < ?", (int(now), ABANDONED, job_id, now))
                if cur.rowcount == 1:
                    self._event(conn, job_id, f"the job failed: {ABANDONED}", level="error")
                    failed += 1
        return failed

    def add_event(self, job_id: str, message: str, data: dict | None = None, level: str = "info") -> None:
        with self.db.write() as conn:
            self._event(conn, job_id, message, data, level)

    def events(self, account: str, job_id: str) -> list[dict]:
        self.get(account, job_id)
        with self.db.read() as conn:
            rows = conn.execute("SELECT seq, created_at, level, message, data FROM training_job_events WHERE job=? "
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
