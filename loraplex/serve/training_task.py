"""A fine-tuning job's training as a Ray task: the scale-out server's launch (training/launch.py),
so training runs on whichever node of the cluster has `train_num_cpus` / `train_num_gpus` free,
not on the ingress machine beside it.

The task is named `loraplex-train-<job id>` and is never retried (`max_retries=0`: a rerun would
replay the job's step events). It reads the base model from the runner's `model_dir` (the same
path on every node), takes the JSONL bytes as an argument, trains with `train_lora` in a temporary
folder of its node, and returns ("done", loss, tokens, {file name: bytes}) — the two PEFT files,
which RayTraining writes to the runner's `out_dir` — or ("error", message). While it trains it
puts ("note", where it runs) and then ("step", StepReport) on a `ray.util.queue.Queue` (an actor
taking no CPU, placed by Ray) that RayTraining drains; the queue is the runner's, one per job, and
is killed by `stop`. `stop` force-cancels the task (its worker process is killed) and waits for it
to end. A task whose worker or node dies answers ("error", "… the training task was lost …").
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections import deque
from pathlib import Path

import ray
from ray.util.queue import Empty, Queue

from loraplex.config import ScaleoutConfig

TASK_PREFIX = "loraplex-train-"
STOP_WAIT_S = 60.0  # how long `stop` waits for a cancelled task to end


def _train(model_dir: str, data: bytes, hp: dict, seed: int, threads: int, events: Queue) -> tuple:
    import torch

    from loraplex.training.trainer import train_lora
    torch.set_num_threads(threads)
    events.put(("note", f"training as Ray task {ray.get_runtime_context().get_task_name()} on node "
                        f"{ray.get_runtime_context().get_node_id()} ({socket.gethostname()}), pid {os.getpid()}"))
    work = Path(tempfile.mkdtemp(prefix="loraplex-task-"))
    try:
        result = train_lora(Path(model_dir), data, work, hp, seed, on_step=lambda report: events.put(("step", report)))
        return "done", result.loss, result.trained_tokens, {f.name: f.read_bytes() for f in work.iterdir()}
    except Exception as e:  # the runner fails the job with it
        return "error", f"{type(e).__name__}: {e}"
    finally:
        shutil.rmtree(work, ignore_errors=True)


_train_task = ray.remote(max_retries=0)(_train)


class RayTraining:
    """One job's Ray task and its event queue (see the module docstring); used from the runner's thread."""

    def __init__(self, job_id: str, model_dir: Path, data: bytes, out_dir: Path, hp: dict, seed: int,
                 scaleout: ScaleoutConfig):
        self.out_dir = out_dir
        self._events = Queue(actor_options={"num_cpus": 0})
        self._pending: deque[tuple] = deque()  # drained from the queue once the task ended, then its outcome
        self._ended = False
        threads = max(1, int(scaleout.train_num_cpus))
        try:
            self.ref = _train_task.options(name=TASK_PREFIX + job_id, num_cpus=scaleout.train_num_cpus,
                                           num_gpus=scaleout.train_num_gpus).remote(
                str(model_dir), data, hp, seed, threads, self._events)
        except BaseException:  # not submitted: the runner fails the job; the queue goes
            self._events.shutdown(force=True)
            raise

    def next_event(self, timeout_s: float) -> tuple | None:
        if self._pending:
            return self._pending.popleft()
        if self._ended:
            return None
        wait_s = 0.0
        try:
            return self._events.get(timeout=timeout_s)
        except Empty:
            pass
        except ray.exceptions.RayError:  # the queue was lost with its node: the task's next put fails it
            wait_s = timeout_s
        if not ray.wait([self.ref], timeout=wait_s)[0]:
            return None
        self._ended = True  # every put happened before the task returned: drain, then the outcome
        try:
            while not self._events.empty():
                self._pending.append(self._events.get_nowait())
        except (Empty, ray.exceptions.RayError):
            pass
        self._pending.append(self._outcome())
        return self._pending.popleft()

    def _outcome(self) -> tuple:
        try:
            result = ray.get(self.ref)
        except ray.exceptions.RayError as e:
            return "error", f"the training task was lost ({type(e).__name__}): {str(e).splitlines()[0][:500]}"
        if result[0] != "done":
            return result
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, content in result[3].items():
            (self.out_dir / name).write_bytes(content)
        return result[:3]

    def stop(self) -> None:
        if not self._ended:
            ray.cancel(self.ref, force=True)
            ray.wait([self.ref], timeout=STOP_WAIT_S)
            self._ended = True
        self._events.shutdown(force=True)


def ray_launch(scaleout: ScaleoutConfig):
    """The runner's launch (training/launch.py `Launch`) on the Ray this process has joined."""
    def launch(job_id: str, model_dir: Path, data: bytes, out_dir: Path, hp: dict, seed: int) -> RayTraining:
        return RayTraining(job_id, model_dir, data, out_dir, hp, seed, scaleout)
    return launch
