"""OpenAI Files API under /accounts/{a}/ai/v1/files (purpose `fine-tune` only).

Every line of an upload is validated (roles, non-empty content, fits the served model's context
through the server's own chat template); the refusal names the lines. Store calls (SQLite, disk,
tokenizing) run in worker threads. Another account's file answers 404, as a missing one.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool as to_thread

from loraplex.api.auth import authorized_context
from loraplex.api.errors import invalid

router = APIRouter()
PREFIX = "/accounts/{account_id}/ai/v1/files"


@router.post(PREFIX)
async def create_file(account_id: str, request: Request):
    ctx = await authorized_context(request, account_id)
    form = await request.form()
    upload, purpose = form.get("file"), form.get("purpose")
    if upload is None or isinstance(upload, str):
        raise invalid("a multipart field `file` is required")
    if not isinstance(purpose, str):
        raise invalid("a form field `purpose` is required")
    data = await upload.read()
    count = lambda messages: len(ctx.tokenizer.encode_chat(messages))  # noqa: E731
    record = await to_thread(ctx.files.create, account_id, purpose, upload.filename or "", data,
                             count, ctx.max_model_len)
    return record.as_openai()


@router.get(PREFIX)
async def list_files(account_id: str, request: Request):
    ctx = await authorized_context(request, account_id)
    records = await to_thread(ctx.files.list, account_id)
    return {"object": "list", "data": [r.as_openai() for r in records], "has_more": False}


@router.get(PREFIX + "/{file_id}")
async def get_file(account_id: str, file_id: str, request: Request):
    ctx = await authorized_context(request, account_id)
    return (await to_thread(ctx.files.get, account_id, file_id)).as_openai()


@router.get(PREFIX + "/{file_id}/content")
async def file_content(account_id: str, file_id: str, request: Request):
    ctx = await authorized_context(request, account_id)
    data = await to_thread(ctx.files.content, account_id, file_id)
    return Response(data, media_type="application/jsonl")


@router.delete(PREFIX + "/{file_id}")
async def delete_file(account_id: str, file_id: str, request: Request):
    ctx = await authorized_context(request, account_id)
    await to_thread(ctx.files.delete, account_id, file_id)
    return {"id": file_id, "object": "file", "deleted": True}
