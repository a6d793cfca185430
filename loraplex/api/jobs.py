"""OpenAI fine-tuning jobs under /accounts/{a}/ai/v1/fine_tuning/jobs: create, list, get, cancel,
events, checkpoints. A job is checked before it is stored: the model must be the served base
model, the files must be the account's own, the hyperparameters in range; a refusal stores
nothing. Jobs wait `queued` for the trainer worker. Store calls run in worker threads.

The job, event and checkpoint objects (`as_openai`, `event_json`, `checkpoint_json`) and the
create check (`create`) are shared with the Workers AI dialect's routes (jobs_workers_ai.py).
"""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool as to_thread

from loraplex.api.auth import authorize
from loraplex.api.context import ApiContext
from loraplex.adapters.cache import CONFIG_FILE, WEIGHTS_FILE
from loraplex.adapters.registry_rules import NAME_RE
from loraplex.api.errors import invalid
from loraplex.api.uploads import delete_unused_objects, store_asset
from loraplex.errors import LimitReached
from loraplex.training.hyperparameters import check_hyperparameters
from loraplex.training.jobs import Job


JOB_ID_CHARS_IN_NAME = 12  # a finetune made by a job is named SUFFIX-<this many characters of the job id>
MAX_SUFFIX_CHARS = 64 - 1 - JOB_ID_CHARS_IN_NAME  # so that the name fits the registry's 64 characters


def finetune_name(suffix: str | None, job_id: str) -> str:
    return f"{suffix or 'ft'}-{job_id.removeprefix('ftjob-')[:JOB_ID_CHARS_IN_NAME]}"


def publish(ctx: ApiContext, job: Job, folder) -> str:
    """Register the trained PEFT folder as a finetune of the job's account, through the upload
    path's validation and storage; returns `BASE:NAME`. On any refusal the finetune and its
    objects are removed again (nothing left behind) and the error propagates; an account at its
    finetune limit gets a LimitReached that says the job's training is lost. Blocking."""
    name = finetune_name(job.suffix, job.id)
    try:
        finetune = ctx.registry.create_finetune(job.account, name, ctx.model_name, f"fine-tuning job {job.id}")
    except LimitReached as e:
        raise LimitReached(f"the trained adapter could not be published: {e.message}, then create the job "
                           "again") from None
    try:
        for file_name in (CONFIG_FILE, WEIGHTS_FILE):
            with open(folder / file_name, "rb") as src:
                finetune = store_asset(ctx, job.account, finetune, file_name, src)
    except BaseException:
        delete_unused_objects(ctx, ctx.registry.delete_finetune(job.account, finetune.id))
        raise
    return f"{ctx.model_name}:{name}"


def unpublish(ctx: ApiContext, job: Job, fine_tuned_model: str) -> None:
    """Take back what `publish` registered for `job` (a cancel won the race): the finetune is
    deleted as `DELETE …/finetunes/{id}` deletes it (the engine forgets it, unused objects go).
    Blocking; call it from a thread that runs no event loop (the trainer's)."""
    finetune = ctx.registry.delete_finetune(job.account, fine_tuned_model.rpartition(":")[2])
    asyncio.run(ctx.engine.forget_lora(finetune.id))
    delete_unused_objects(ctx, finetune)


router = APIRouter()
PREFIX = "/accounts/{account_id}/ai/v1/fine_tuning/jobs"


def as_openai(job: Job) -> dict:
    hp = job.hyperparameters
    return {"id": job.id, "object": "fine_tuning.job", "created_at": job.created_at, "model": job.model,
            "training_file": job.training_file, "validation_file": job.validation_file, "status": job.status,
            "fine_tuned_model": job.fine_tuned_model, "finished_at": job.finished_at, "seed": job.seed,
            "hyperparameters": {k: hp[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")},
            "error": {"code": "training_failed", "message": job.error, "param": None} if job.error else None,
            "organization_id": job.account, "result_files": [], "trained_tokens": job.trained_tokens,
            "suffix": job.suffix, "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}}


def event_json(event: dict) -> dict:
    return {"id": f"ftevent-{event['seq']}", "object": "fine_tuning.job.event", "created_at": event["created_at"],
            "level": event["level"], "message": event["message"], "data": event["data"],
            "type": "metrics" if event["data"] else "message"}


def checkpoint_json(job_id: str, checkpoint: dict) -> dict:
    metrics = checkpoint["metrics"]
    return {"id": f"ftckpt-{job_id.removeprefix('ftjob-')}-{checkpoint['step']}",
            "object": "fine_tuning.job.checkpoint", "created_at": checkpoint["created_at"],
            "fine_tuned_model_checkpoint": checkpoint["fine_tuned_model"], "fine_tuning_job_id": job_id,
            "step_number": checkpoint["step"],
            "metrics": {"step": metrics.get("step"), "train_loss": metrics.get("train_loss")}}


def create(ctx: ApiContext, account_id: str, body: dict) -> Job:
    """Check an OpenAI-shaped create body and store the job `queued` (blocking)."""
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object")
    if body.get("model") not in ctx.served_names:
        raise invalid(f"model {body.get('model')!r} is not served here; use {ctx.model_name!r}")
    for field in ("training_file", "validation_file"):
        if body.get(field) is not None or field == "training_file":
            if not isinstance(body.get(field), str):
                raise invalid(f"`{field}` must be a file id")
            ctx.files.get(account_id, body[field])  # NotFound for another account's file
    method = body.get("method") or {}
    raw = (method.get("supervised") or {}).get("hyperparameters") if isinstance(method, dict) else None
    hp = check_hyperparameters(raw if raw is not None else body.get("hyperparameters"), ctx.limits.max_lora_rank)
    seed, suffix = body.get("seed", 0), body.get("suffix")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise invalid("`seed` must be an integer in [0, 2147483647]")
    if suffix is not None and not (isinstance(suffix, str) and NAME_RE.fullmatch(suffix)
                                   and len(suffix) <= MAX_SUFFIX_CHARS):
        raise invalid(f"`suffix` must be 1 to {MAX_SUFFIX_CHARS} characters of A-Z a-z 0-9 . _ - "
                      "(it begins the finetune's name)")
    job = ctx.jobs.create(account_id, ctx.model_name, body["training_file"], hp,
                          validation_file=body.get("validation_file"), suffix=suffix, seed=seed)
    ctx.jobs.mark_queued(job.id)
    return ctx.jobs.get(account_id, job.id)


@router.post(PREFIX)
async def create_job(account_id: str, request: Request):
    await authorize(request, account_id)
    ctx: ApiContext = request.app.state.ctx
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):
        raise invalid("the request body is not valid JSON") from None
    return as_openai(await to_thread(create, ctx, account_id, body))


@router.get(PREFIX)
async def list_jobs(account_id: str, request: Request):
    await authorize(request, account_id)
    jobs = await to_thread(request.app.state.ctx.jobs.list, account_id)
    return {"object": "list", "data": [as_openai(j) for j in jobs], "has_more": False}


@router.get(PREFIX + "/{job_id}")
async def get_job(account_id: str, job_id: str, request: Request):
    await authorize(request, account_id)
    return as_openai(await to_thread(request.app.state.ctx.jobs.get, account_id, job_id))


@router.post(PREFIX + "/{job_id}/cancel")
async def cancel_job(account_id: str, job_id: str, request: Request):
    await authorize(request, account_id)
    return as_openai(await to_thread(request.app.state.ctx.jobs.cancel, account_id, job_id))


@router.get(PREFIX + "/{job_id}/events")
async def job_events(account_id: str, job_id: str, request: Request):
    await authorize(request, account_id)
    events = await to_thread(request.app.state.ctx.jobs.events, account_id, job_id)
    return {"object": "list", "data": [event_json(e) for e in reversed(events)], "has_more": False}


@router.get(PREFIX + "/{job_id}/checkpoints")
async def job_checkpoints(account_id: str, job_id: str, request: Request):
    """The final checkpoint of a succeeded job (its served finetune); an empty list otherwise."""
    await authorize(request, account_id)
    checkpoints = await to_thread(request.app.state.ctx.jobs.checkpoints, account_id, job_id)
    data = [checkpoint_json(job_id, c) for c in reversed(checkpoints)]
    return {"object": "list", "data": data, "has_more": False,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def start_runner(ctx: ApiContext):
    """The server's trainer (training/runner.py), started with the app; None without a job store.
    It trains as `ctx.launch_training` says (the scale-out ingress: Ray tasks), else in a local process."""
    from loraplex.training.runner import JobRunner

    if ctx.jobs is None or ctx.model_dir is None:
        return None
    launch = {} if ctx.launch_training is None else {"launch": ctx.launch_training}
    runner = JobRunner(ctx.jobs, ctx.files, ctx.model_dir, lambda job, folder: publish(ctx, job, folder),
                       lambda job, name: unpublish(ctx, job, name), **launch)
    runner.start()
    return runner
