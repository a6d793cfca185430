"""The OpenAI dialect under /accounts/{a}/ai/v1: chat/completions, completions, models.

A LoRA is chosen by a `lora` body field or by `model: "BASE:FINETUNE"`.
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool as to_thread

from loraplex.api.auth import authorize
from loraplex.api.body import parse_body
from loraplex.api.context import ApiContext
from loraplex.api.errors import invalid
from loraplex.api.choices import Choices, CompletionLogprobs, chat_logprobs, choice_params
from loraplex.api.request_log import capture
from loraplex.api.schemas import ChatCompletionRequest, CompletionRequest, json_body
from loraplex.api.streaming import DONE, sse, sse_response
from loraplex.core import SamplingParams

router = APIRouter()
PREFIX = "/accounts/{account_id}/ai/v1"


def split_model(ctx: ApiContext, model: str, lora: str | None) -> str | None:
    """Check the base model; return the finetune named by `BASE:FINETUNE` or the `lora` field."""
    if model not in ctx.served_names and ":" in model:
        model, _, named = model.rpartition(":")
        if lora is not None and lora != named:
            raise invalid(f"the model names finetune {named!r} but `lora` is {lora!r}")
        lora = named
    ctx.check_model(model)
    return lora


def base_model(ctx: ApiContext, model: str) -> str:
    """The base model a (checked) `model` names: itself, or BASE of `BASE:FINETUNE`."""
    return model if model in ctx.served_names else model.rpartition(":")[0]


def sampling_params(ctx: ApiContext, body, prompt_len: int, max_tokens: int | None,
                    top_logprobs: int | None) -> SamplingParams:
    """`top_logprobs`: None → no logprobs; k → logprobs with k alternatives per token."""
    if max_tokens is not None:
        ctx.check_max_tokens(max_tokens)
    else:
        max_tokens = max(1, ctx.max_model_len - prompt_len)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p if body.top_p is not None else 1.0,
        seed=body.seed,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        stop=body.stop,
        logprobs=top_logprobs is not None,
        top_logprobs=top_logprobs or 0,
    )


async def _start(request: Request, account_id: str, schema):
    ctx: ApiContext = request.app.state.ctx
    await authorize(request, account_id)
    body = await parse_body(request, schema)
    adapter = await ctx.adapter_for(account_id, split_model(ctx, body.model, body.lora))
    return ctx, body, adapter


def _usage_chunk(base: dict, choices: Choices, body) -> list[bytes]:
    if body.stream_options and body.stream_options.include_usage:
        return [sse(base | {"choices": [], "usage": choices.usage()})]
    return []


@router.post(PREFIX + "/chat/completions", openapi_extra=json_body(ChatCompletionRequest))
async def chat_completions(account_id: str, request: Request):
    ctx, body, adapter = await _start(request, account_id, ChatCompletionRequest)
    messages = [m.as_dict() for m in body.messages]
    prompt_ids = await ctx.encode_chat(messages)
    await capture(request, account_id, "openai-chat", base_model(ctx, body.model), messages=messages)
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(ctx, body, len(prompt_ids), body.max_completion_tokens or body.max_tokens, top)
    choices = await Choices.start(ctx, prompt_ids, choice_params(params, body.n), adapter, request)
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
    if body.stream:
        chunk = base | {"object": "chat.completion.chunk"}

        def event(index: int, delta: dict, finish_reason=None, logprobs=None) -> bytes:
            return sse(chunk | {"choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                             "finish_reason": finish_reason}]})

        async def events():
            for i in range(body.n):
                yield event(i, {"role": "assistant", "content": ""})
            async for i, delta in choices.deltas():
                out = choices.gens[i].output
                if delta is None:
                    yield event(i, {}, out.finish_reason)
                elif delta.text or (body.logprobs and delta.token_end > delta.token_start):
                    logprobs = chat_logprobs(ctx.tokenizer, out, delta.token_start, delta.token_end) \
                        if body.logprobs else None
                    yield event(i, {"content": delta.text}, logprobs=logprobs)
            for e in _usage_chunk(chunk, choices, body):
                yield e
            yield DONE

        return sse_response(choices, events())
    outs = await choices.complete(request)
    return base | {"object": "chat.completion", "usage": choices.usage(), "choices": [
        {"index": i, "message": {"role": "assistant", "content": out.text}, "finish_reason": out.finish_reason,
         "logprobs": chat_logprobs(ctx.tokenizer, out, 0, out.num_generated_tokens) if body.logprobs else None}
        for i, out in enumerate(outs)]}


@router.post(PREFIX + "/completions", openapi_extra=json_body(CompletionRequest))
async def completions(account_id: str, request: Request):
    ctx, body, adapter = await _start(request, account_id, CompletionRequest)
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    prompt_ids = await ctx.encode_prompt(prompt, raw=True)
    await capture(request, account_id, "openai-completions", base_model(ctx, body.model), prompt=prompt)
    params = sampling_params(ctx, body, len(prompt_ids), body.max_tokens, body.logprobs)
    choices = await Choices.start(ctx, prompt_ids, choice_params(params, body.n), adapter, request)
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model,
            "object": "text_completion"}
    formatters = [CompletionLogprobs(ctx.tokenizer) for _ in range(body.n)]
    wants_logprobs = body.logprobs is not None
    if body.stream:
        def event(index: int, text: str, finish_reason=None, logprobs=None) -> bytes:
            return sse(base | {"choices": [{"index": index, "text": text, "finish_reason": finish_reason,
                                            "logprobs": logprobs}]})

        async def events():
            async for i, delta in choices.deltas():
                out = choices.gens[i].output
                if delta is None:
                    yield event(i, "", out.finish_reason)
                elif delta.text or (wants_logprobs and delta.token_end > delta.token_start):
                    logprobs = formatters[i].of(out, delta.token_start, delta.token_end) if wants_logprobs else None
                    yield event(i, delta.text, logprobs=logprobs)
            for e in _usage_chunk(base, choices, body):
                yield e
            yield DONE

        return sse_response(choices, events())
    outs = await choices.complete(request)
    return base | {"usage": choices.usage(), "choices": [
        {"index": i, "text": out.text, "finish_reason": out.finish_reason,
         "logprobs": formatters[i].of(out, 0, out.num_generated_tokens) if wants_logprobs else None}
        for i, out in enumerate(outs)]}


@router.get(PREFIX + "/models")
async def list_models(account_id: str, request: Request):
    """The base model, its alias, and every ready finetune this account may use, as BASE:FINETUNE."""
    ctx: ApiContext = request.app.state.ctx
    await authorize(request, account_id)
    own = await to_thread(ctx.registry.list_finetunes, account_id)
    public = await to_thread(ctx.registry.list_public)
    ids = list(ctx.served_names)
    seen = set()
    for f in own + public:
        if f.state == "ready" and f.model in ctx.served_names and f.id not in seen:
            seen.add(f.id)
            ids.append(f"{ctx.model_name}:{f.name if f.account_id == account_id else f.id}")
    return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "loraplex"} for i in ids]}
