"""Fine-tuning jobs in the Workers AI dialect, under /accounts/{a}/ai/fine-tuning/jobs: create,
list, get, cancel, events, checkpoints. The same jobs as the OpenAI routes (jobs.py), over the
same JobStore, with the same checks and objects; only the framing differs: answers in the
Workers AI envelope (`{"result": …, "success": true, …}`), refusals as Workers AI errors
(`{"errors": [{"code", "message"}]}`), lists paginated as every Workers AI list is
(pagination.py). Events come oldest first (OpenAI's route answers newest first), so a client
following a job appends what is new.

The path is `fine-tuning/jobs`, not `finetunes/jobs`: `…/ai/finetunes/{finetune_id}` stays the
finetune of that name or id (a finetune may be named "jobs"). Store calls run in worker threads.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool as to_thread

from loraplex.api.auth import authorized_context
from loraplex.api.errors import envelope, invalid
from loraplex.api.jobs import as_openai, checkpoint_json, create, event_json
from loraplex.api.pagination import PAGE_PARAMS, paginated

router = APIRouter()
PREFIX = "/accounts/{account_id}/ai/fine-tuning/jobs"


@router.post(PREFIX)
async def create_job(account_id: str, request: Request):
    """Body as OpenAI's `POST /v1/fine_tuning/jobs`: `model`, `training_file` (a file id from
    `POST …/ai/v1/files`), `validation_file`, `suffix`, `seed`, `hyperparameters` or
    `method.supervised.hyperparameters`."""
    ctx = await authorized_context(request, account_id)
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):
        raise invalid("the request body is not valid JSON") from None
    return envelope(as_openai(await to_thread(create, ctx, account_id, body)))


@router.get(PREFIX, openapi_extra=PAGE_PARAMS)
async def list_jobs(account_id: str, request: Request):
    ctx = await authorized_context(request, account_id)
    return paginated(request, [as_openai(j) for j in await to_thread(ctx.jobs.list, account_id)])


@router.get(PREFIX + "/{job_id}")
async def get_job(account_id: str, job_id: str, request: Request):
    ctx = await authorized_context(request, account_id)
    return envelope(as_openai(await to_thread(ctx.jobs.get, account_id, job_id)))


@router.post(PREFIX + "/{job_id}/cancel")
async def cancel_job(account_id: str, job_id: str, request: Request):
    ctx = await authorized_context(request, account_id)
    return envelope(as_openai(await to_thread(ctx.jobs.cancel, account_id, job_id)))


@router.get(PREFIX + "/{job_id}/events", openapi_extra=PAGE_PARAMS)
async def job_events(account_id: str, job_id: str, request: Request):
    """Oldest first; metrics events carry `step`, `total_steps`, `epoch`, `train_loss`,
    `learning_rate`, `trained_tokens`, `elapsed_seconds`, `eta_seconds` in `data`."""
    ctx = await authorized_context(request, account_id)
    return paginated(request, [event_json(e) for e in await to_thread(ctx.jobs.events, account_id, job_id)])


@router.get(PREFIX + "/{job_id}/checkpoints")
async def job_checkpoints(account_id: str, job_id: str, request: Request):
    ctx = await authorized_context(request, account_id)
    checkpoints = await to_thread(ctx.jobs.checkpoints, account_id, job_id)
    return envelope([checkpoint_json(job_id, c) for c in checkpoints])
