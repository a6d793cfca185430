"""JobRunner: the server's one trainer slot. A thread claims queued jobs (fairly, JobStore.claim_next)
and trains each away from the serving threads, as its `launch` says (training/launch.py): by
default in a spawned worker *process* on this machine (torch at 1 thread there); on the scale-out
server (`serve --replicas`) as a Ray task that runs on whichever node of the cluster has the
resources it asks for (serve/training_task.py: events come back through a Ray queue, the adapter's
files as the task's result). The launch is the only difference: claim, lease, events, cancel
(the training is stopped: the process terminated, the task force-cancelled) and publish are the
runner's, the same for both. A training that dies (process killed, node lost) fails the job.
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
from loraplex.training.launch import Launch, Training, launch_local_process
from loraplex.training.trainer import StepReport

log = logging.getLogger(__name__)
STARTED = "training started by trainer "  # the runner's first event for a job it claimed, + its id
SERVER_STOPPED = "the server running the job stopped"
STOPPED = "the trainer stopped: "  # the runner's last event for a job it stopped (cancel, shutdown)


class JobRunner:
    def __init__(self, jobs: JobStore, files: FileStore, model_dir: Path,
                 publish: Callable[[Job, Path], str], unpublish: Callable[[Job, str], None],
                 poll_s: float = 0.2, launch: Launch = launch_local_process):
        self.jobs, self.files, self.model_dir, self.poll_s, self.launch = jobs, files, model_dir, poll_s, launch
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
            training = self.launch(job.id, self.model_dir, data, work / "adapter", job.hyperparameters, job.seed)
            try:
                outcome = self._follow(job, training)
            finally:
                training.stop()  # stopped, cancelled, or an error here: the training goes too
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

    def _follow(self, job: Job, training: Training) -> tuple | None:
        """Relay the training's events until it ends: its outcome ("done", loss, tokens) or
        ("error", message); None when the runner let go of the job (cancelled, lost, stopping)."""
        self.jobs.add_event(job.id, f"{STARTED}{self.trainer}")
        outcome = None
        while outcome is None:
            if self._stop.is_set() or not self._still_mine(job):
                training.stop()
                if self._stop.is_set():  # the server stops: the job fails now, not a lease later
                    self.jobs.finish(job.id, "failed", error=SERVER_STOPPED)
                self.jobs.add_event(job.id, STOPPED + "nothing was published")
                return None
            event = training.next_event(self.poll_s)
            if event is None:
                continue
            if event[0] not in ("note", "step"):
                outcome = event
                continue
            try:
                if event[0] == "note":
                    self.jobs.add_event(job.id, event[1])
                else:
                    self._step_event(job, event[1])
            except Unavailable:  # an event is lost, the training goes on
                log.warning("job %s: an event was not stored (the fine-tuning store is unavailable)", job.id)
        return outcome

    def _step_event(self, job: Job, report: StepReport) -> None:
        data = {"step": report.step, "total_steps": report.total_steps, "epoch": report.epoch,
                "train_loss": report.loss, "learning_rate": report.learning_rate,
                "trained_tokens": report.trained_tokens, "elapsed_seconds": round(report.elapsed_s, 3),
                "eta_seconds": round(report.eta_s, 1)}
        self.jobs.add_event(job.id, f"step {report.step}/{report.total_steps}: training loss={report.loss:.4f}, "
                                    f"about {report.eta_s:.0f} s left", data)
