"""Finetunes in the Workers AI dialect: create, list (own / public; paginated, see pagination.py),
get, delete, upload assets, read back the stored adapter_config.json."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool as to_thread
from starlette.datastructures import UploadFile

from loraplex.adapters.cache import CONFIG_FILE
from loraplex.adapters.registry import Finetune
from loraplex.api.auth import authorized_context
from loraplex.api.body import parse_body
from loraplex.api.errors import ApiError, api_error_in, envelope, invalid
from loraplex.api.pagination import PAGE_PARAMS, paginated
from loraplex.api.schemas import ASSET_UPLOAD_BODY, FinetuneCreate, json_body
from loraplex.api.uploads import check_file_name, delete_unused_objects, record_refusal, store_asset
from loraplex.errors import AdapterFilesMissing

router = APIRouter()
PREFIX = "/accounts/{account_id}/ai/finetunes"


def finetune_json(f: Finetune, detailed: bool = False) -> dict:
    """`state` is "pending", "ready" or "invalid"; `state_reason` says why it is invalid (else null)."""
    out = {"id": f.id, "name": f.name, "model": f.model, "description": f.description, "public": f.public,
           "created_at": f.created_at, "modified_at": f.modified_at, "state": f.state, "state_reason": f.state_reason}
    if detailed:
        out["assets"] = [{"file_name": a.file_name, "size": a.size, "sha256": a.sha256} for a in f.assets.values()]
    return out


@router.post(PREFIX, openapi_extra=json_body(FinetuneCreate))
async def create_finetune(account_id: str, request: Request):
    ctx = await authorized_context(request, account_id)
    body = await parse_body(request, FinetuneCreate)
    ctx.check_model(body.model)
    finetune = await to_thread(ctx.registry.create_finetune, account_id, body.name, body.model,
                               body.description, body.public)
    return envelope(finetune_json(finetune))


@router.get(PREFIX, openapi_extra=PAGE_PARAMS)
async def list_finetunes(account_id: str, request: Request):
    ctx = await authorized_context(request, account_id)
    return paginated(request, [finetune_json(f) for f in await to_thread(ctx.registry.list_finetunes, account_id)])


@router.get(PREFIX + "/public", openapi_extra=PAGE_PARAMS)
async def list_public_finetunes(account_id: str, request: Request):
    ctx = await authorized_context(request, account_id)
    return paginated(request, [finetune_json(f) for f in await to_thread(ctx.registry.list_public)])


@router.get(PREFIX + "/{finetune_id}")
async def get_finetune(account_id: str, finetune_id: str, request: Request):
    ctx = await authorized_context(request, account_id)
    return envelope(finetune_json(await to_thread(ctx.registry.get_finetune, account_id, finetune_id), detailed=True))


@router.delete(PREFIX + "/{finetune_id}")
async def delete_finetune(account_id: str, finetune_id: str, request: Request):
    """Deleted at once for new requests; requests already running with it finish first."""
    ctx = await authorized_context(request, account_id)
    finetune = await to_thread(ctx.registry.delete_finetune, account_id, finetune_id)
    await ctx.engine.forget_lora(finetune.id)
    await to_thread(delete_unused_objects, ctx, finetune)
    return envelope({"id": finetune.id})


@router.post(PREFIX + "/{finetune_id}/finetune-assets", openapi_extra=ASSET_UPLOAD_BODY)
async def upload_asset(account_id: str, finetune_id: str, request: Request):
    """Multipart `file_name` + `file`, once per file. The body limit is enforced while it streams in."""
    ctx = await authorized_context(request, account_id)
    finetune = await to_thread(ctx.registry.get_finetune, account_id, finetune_id)
    if finetune.account_id != account_id:
        raise ApiError(10000, "forbidden: only the owning account can modify this finetune", 403)
    try:
        form = await request.form(max_files=1, max_fields=8)
    except Exception as e:  # the body limit (possibly inside an exception group), or bad multipart framing
        error = api_error_in(e)
        if error is not None:  # over the body limit: the file is too large for any finetune
            await to_thread(record_refusal, ctx, account_id, finetune.id, "the upload", error)
        raise error or invalid(f"the body is not a valid multipart form ({str(e)[:200]})") from None
    try:
        file_name = check_file_name(form.get("file_name"))
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise invalid("`file` is required: the file's bytes as a multipart file part")
        await to_thread(store_asset, ctx, account_id, finetune, file_name, upload.file)
    finally:
        await form.close()
    return envelope({})


@router.get(PREFIX + "/{finetune_id}/finetune-assets/" + CONFIG_FILE)
async def get_adapter_config(account_id: str, finetune_id: str, request: Request):
    """The stored adapter_config.json (as uploaded: PEFT's `r`, `lora_alpha`, `target_modules`…)
    of a finetune the caller may read, as GET …/finetunes/{id} allows. 400 / 3039 before it was
    uploaded. (The web console shows rank and targets from it.)"""
    ctx = await authorized_context(request, account_id)
    finetune = await to_thread(ctx.registry.get_finetune, account_id, finetune_id)
    asset = finetune.assets.get(CONFIG_FILE)
    if asset is None:
        raise AdapterFilesMissing(f"finetune {finetune.name!r} has no {CONFIG_FILE} yet: upload it first")
    return Response(await to_thread(ctx.store.get_bytes, asset.object_key), media_type="application/json")
