"""How the JobRunner launches one job's training: the seam between the runner (claim, lease,
cancel, publish: training/runner.py) and where the training runs.

A `Launch` is called as `launch(job_id, model_dir, data, out_dir, hp, seed)` and returns a
`Training` already started: `train_lora` (trainer.py) on the base model folder `model_dir` and the
JSONL bytes `data`. The runner owns the Training and calls, from its one thread:

- `next_event(timeout_s)`: the next event, or None when none came within `timeout_s`:
  ("step", StepReport) after each optimizer step; ("note", message) a plain event for the job
  (the Ray task says where it runs); and last, once, either ("done", loss, trained_tokens), the PEFT
  folder then written to `out_dir` on the runner's machine, or ("error", message), the training
  failed or its process or task died. No event follows the last.
- `stop()`: end the training if it still runs and wait for it to end; idempotent, also after
  the last event.

Two launches: `launch_local_process` here (a spawned process on the runner's machine, events
through a multiprocessing queue, torch at 1 thread) and serve/training_task.py's Ray task (the
scale-out server's).
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from pathlib import Path
from typing import Protocol


class Training(Protocol):
    def next_event(self, timeout_s: float) -> tuple | None: ...

    def stop(self) -> None: ...


Launch = Callable[[str, Path, bytes, Path, dict, int], Training]


def _train_in_child(model_dir, data, out_dir, hp, seed, events):
    import torch

    from loraplex.training.trainer import train_lora
    torch.set_num_threads(1)
    try:
        result = train_lora(Path(model_dir), data, Path(out_dir), hp, seed,
                            on_step=lambda report: events.put(("step", report)))
        events.put(("done", result.loss, result.trained_tokens))
    except BaseException as e:  # reported to the runner, which fails the job
        events.put(("error", f"{type(e).__name__}: {e}"))


class LocalProcess:
    """A spawned child process that trains and writes the adapter to `out_dir` itself."""

    def __init__(self, model_dir: Path, data: bytes, out_dir: Path, hp: dict, seed: int):
        ctx = mp.get_context("spawn")
        self._events = ctx.Queue()
        self._child = ctx.Process(target=_train_in_child, daemon=True,
                                  args=(str(model_dir), data, str(out_dir), hp, seed, self._events))
        self._child.start()

    def next_event(self, timeout_s: float) -> tuple | None:
        try:
            return self._events.get(timeout=timeout_s)
        except Exception:  # empty, as before (or the queue broke with the child)
            if not self._child.is_alive() and self._events.empty():
                return "error", f"the trainer process exited with {self._child.exitcode}"
            return None

    def stop(self) -> None:
        if self._child.is_alive():
            self._child.terminate()
        self._child.join()


def launch_local_process(job_id: str, model_dir: Path, data: bytes, out_dir: Path, hp: dict, seed: int) -> LocalProcess:
    return LocalProcess(model_dir, data, out_dir, hp, seed)
