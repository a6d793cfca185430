"""JobRunner: the server's one trainer slot. A thread claims queued jobs (fairly, JobStore.claim_next)
and trains each in a worker *process* (spawned; torch at 1 thread there), so serving goes on.
On success the adapter goes through the upload path's validation and storage (`publish`, given
by the API layer) and the job records `fine_tuned_model` = `BASE:NAME` and `trained_tokens`; on
failure or cancel nothing is published and the job's temporary folder is removed. A cancel that
lands while the adapter is being published wins (JobStore's rule): the runner takes the finetune
back out with `unpublish(job, name)`. Each step adds an event with its metrics: `step`,
`total_steps`, `epoch`, `train_loss`, `learning_rate`, `trained_tokens`, `elapsed_seconds` (since
the first step began) and `eta_seconds` (seconds left at the mean pace so far). When the runner lets go of a job it did not finish (cancelled, or
the server stopping, which fails the job) its last event starts with `STOPPED`; after it, the runner touches the job
no more. One job at a time per runner.

Across servers (JobStore's claim and lease rule): the runner has its own trainer id; it claims
jobs as that trainer, renews the job's lease every `lease_s / 3` while it trains or publishes, and
lets go (STOPPED) as soon as the job is no longer running for it — cancelled through any server,
or failed as abandoned. While idle it fails other trainers' abandoned jobs (`fail_abandoned`).
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
import tempfile
import threading
import logging
import time
from collections.abc import Callable
from pathlib import Path

from loraplex.errors import Unavailable
from loraplex.training.files import FileStore
from loraplex.training.jobs import Job, JobStore, new_trainer_id
from loraplex.training.trainer import StepReport

log = logging.getLogger(__name__)
STARTED = "training started by trainer "  # the runner's first event for a job it claimed, + its id
SERVER_STOPPED = "the server running the job stopped"
STOPPED = "the trainer stopped: "  # the runner's last event for a job it stopped (cancel, shutdown)


def _train_in_child(model_dir, data, out_dir, hp, seed, events):
    import torch

    from loraplex.training.trainer import train_lora
    torch.set_num_threads(1)
    try:
        result = train_lora(Path(model_dir), data, Path(out_dir), hp, seed,
                            on_step=lambda report: events.put(("step", report)))
        events.put(("done", result.loss, result.trained_tokens))
    except BaseException as e:  # reported to the parent, which fails the job
        events.put(("error", f"{type(e).__name__}: {e}"))


class JobRunner:
    def __init__(self, jobs: JobStore, files: FileStore, model_dir: Path,
                 publish: Callable[[Job, Path], str], unpublish: Callable[[Job, str], None],
                 poll_s: float = 0.2):
        self.jobs, self.files, self.model_dir, self.poll_s = jobs, files, model_dir, poll_s
        self.publish, self.unpublish = publish, unpublish
        self.trainer = new_trainer_id()
        self._renew_every_s = jobs.lease_s / 3
        self._renewed_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="loraplex-trainer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _still_mine(self, job: Job) -> bool:
        """Whether the job is still running for this trainer: its lease renewed when due (a write),
        else its status read. The database unreachable: True (go on; if it stays away past the
        lease, another server fails the job and the next renew here answers False)."""
        try:
            if time.monotonic() - self._renewed_at >= self._renew_every_s:
                renewed = self.jobs.renew(job.id, self.trainer)
                self._renewed_at = time.monotonic()
                return renewed
            return self.jobs.get(job.account, job.id).status == "running"
        except Unavailable:
            log.warning("job %s: the fine-tuning store is unavailable; training goes on", job.id)
            return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.jobs.fail_abandoned()
                job = self.jobs.claim_next(self.trainer)
            except Exception:  # the database unreachable: try again later
                self._stop.wait(self.poll_s)
                continue
            if job is None:
                self._stop.wait(self.poll_s)
                continue
            self._renewed_at = time.monotonic()
            try:
                self._run(job)
            except Exception as e:  # a bug or a publish refusal: the job fails, the runner goes on
                try:
                    if not self.jobs.finish(job.id, "failed", error=str(e)):  # cancelled meanwhile
                        self.jobs.add_event(job.id, STOPPED + str(e))
                except Exception:  # the store unreachable: the job's lease lapses, another server fails it
                    log.exception("job %s: its failure could not be recorded", job.id)

    def _run(self, job: Job) -> None:
        work = Path(tempfile.mkdtemp(prefix="loraplex-job-"))
        try:
            data = self.files.content(job.account, job.training_file)
            ctx = mp.get_context("spawn")
            events = ctx.Queue()
            child = ctx.Process(target=_train_in_child, daemon=True,
                                args=(str(self.model_dir), data, str(work / "adapter"), job.hyperparameters,
                                      job.seed, events))
            child.start()
            try:
                outcome = self._follow(job, child, events)
            finally:
                if child.is_alive():  # stopped, cancelled, or an error here: the child goes too
                    child.terminate()
                child.join()
            if outcome is None:
                return
            if outcome[0] == "error":
                if not self.jobs.finish(job.id, "failed", error=outcome[1]):  # cancelled meanwhile
                    self.jobs.add_event(job.id, STOPPED + "nothing was published")
                return
            self._renewed_at = float("-inf")  # renew now: the lease covers the publish
            if not self._still_mine(job):  # cancelled as training ended
                self.jobs.add_event(job.id, STOPPED + "nothing was published")
                return
            name = self.publish(job, work / "adapter")
            if not self.jobs.finish(job.id, "succeeded", fine_tuned_model=name, trained_tokens=outcome[2]):
                self.unpublish(job, name)  # cancelled while publishing: the cancel wins
                self.jobs.add_event(job.id, STOPPED + f"cancelled while publishing, {name} was deleted again")
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _follow(self, job: Job, child, events) -> tuple | None:
        """Relay the child's step events until it ends: its outcome ("done", loss, tokens) or
        ("error", message); None when the runner let go of the job (cancelled, lost, stopping)."""
        self.jobs.add_event(job.id, f"{STARTED}{self.trainer}")
        outcome = None
        while outcome is None:
            if self._stop.is_set() or not self._still_mine(job):
                child.terminate()
                child.join()
                if self._stop.is_set():  # the server stops: the job fails now, not a lease later
                    self.jobs.finish(job.id, "failed", error=SERVER_STOPPED)
                self.jobs.add_event(job.id, STOPPED + "nothing was published")
                return None
            try:
                event = events.get(timeout=self.poll_s)
            except Exception:
                if not child.is_alive() and events.empty():
                    outcome = ("error", f"the trainer process exited with {child.exitcode}")
                continue
            if event[0] == "step":
                try:
                    self._step_event(job, event[1])
                except Unavailable:  # a step's event is lost, the training goes on
                    log.warning("job %s: a step event was not stored (the fine-tuning store is unavailable)", job.id)
            else:
                outcome = event
        return outcome

    def _step_event(self, job: Job, report: StepReport) -> None:
        data = {"step": report.step, "total_steps": report.total_steps, "epoch": report.epoch,
                "train_loss": report.loss, "learning_rate": report.learning_rate,
                "trained_tokens": report.trained_tokens, "elapsed_seconds": round(report.elapsed_s, 3),
                "eta_seconds": round(report.eta_s, 1)}
        self.jobs.add_event(job.id, f"step {report.step}/{report.total_steps}: training loss={report.loss:.4f}, "
                                    f"about {report.eta_s:.0f} s left", data)
