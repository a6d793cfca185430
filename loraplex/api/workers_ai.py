"""The Workers AI dialect: POST /accounts/{a}/ai/run/{model} and GET /accounts/{a}/ai/models/search
(paginated, see pagination.py).

Model names contain slashes (literal or %2F-encoded: Starlette decodes the path before routing).
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request

from loraplex.api.auth import authorize
from loraplex.api.body import parse_body
from loraplex.api.context import ApiContext
from loraplex.api.errors import envelope
from loraplex.api.generation import Generation
from loraplex.api.pagination import PAGE_PARAMS, paginated
from loraplex.api.request_log import capture
from loraplex.api.schemas import RunRequest, json_body
from loraplex.api.streaming import DONE, sse, sse_response
from loraplex.core import SamplingParams

router = APIRouter()


def sampling_params(body: RunRequest) -> SamplingParams:
    return SamplingParams(
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p if body.top_p is not None else 1.0,
        top_k=body.top_k or 0,
        seed=body.seed,
        repetition_penalty=body.repetition_penalty or 1.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
    )


@router.post("/accounts/{account_id}/ai/run/{model_name:path}", openapi_extra=json_body(RunRequest))
async def run(account_id: str, model_name: str, request: Request):
    ctx: ApiContext = request.app.state.ctx
    await authorize(request, account_id)
    body = await parse_body(request, RunRequest)
    ctx.check_model(model_name)
    ctx.check_max_tokens(body.max_tokens)
    adapter = await ctx.adapter_for(account_id, body.lora)
    if body.messages is not None:
        messages = [m.as_dict() for m in body.messages]
        prompt_ids = await ctx.encode_chat(messages)
        await capture(request, account_id, "workers-ai", model_name, messages=messages)
    else:
        prompt_ids = await ctx.encode_prompt(body.prompt, body.raw)
        await capture(request, account_id, "workers-ai", model_name, prompt=body.prompt if body.raw else None,
                      messages=None if body.raw else [{"role": "user", "content": body.prompt}])
    gen = await Generation.start(ctx, prompt_ids, sampling_params(body), adapter, request)
    if body.stream:
        async def events():
            async for delta in gen.text_deltas():
                yield sse({"response": delta})
            yield sse({"response": "", "usage": gen.usage()})
            yield DONE

        return sse_response(gen, events())
    out = await gen.complete(request)
    return envelope({"response": out.text, "usage": gen.usage()})


def _model_entry(ctx: ApiContext, name: str) -> dict:
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"loraplex:{name}")),
        "source": 1,
        "name": name,
        "description": f"{ctx.model_args.architecture} served by loraplex; accepts LoRA finetunes (`lora`).",
        "task": {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "loraplex:text-generation")),
                 "name": "Text Generation", "description": "Generates text from a prompt or messages."},
        "tags": [],
        "properties": [{"property_id": "lora", "value": "true"},
                       {"property_id": "context_window", "value": str(ctx.max_model_len)}],
    }


@router.get("/accounts/{account_id}/ai/models/search", openapi_extra=PAGE_PARAMS)
async def search_models(account_id: str, request: Request):
    ctx: ApiContext = request.app.state.ctx
    await authorize(request, account_id)
    return paginated(request, [_model_entry(ctx, name) for name in ctx.served_names])
