"""One generation request as both dialects serve it: started eagerly (so that a failure before
the first token — an adapter that will not load, a full queue — is a proper HTTP error), then
read whole or as deltas for streaming. When it ends (finished, failed or abandoned) it
records its metrics and logs one line: request id, account, finetune, prompt and output token
counts, TTFT, duration and finish reason — never the prompt, the output or the API token. When
its request is logged for the tenant (request_log.py), it hands its record to the request logs.

A client that leaves is noticed at every stage that waits on the engine: before the first token
(`start(..., request)`), while a non-streamed answer is generated (`complete(request)`), and
mid-stream (the streaming response cancels its body). In each case the request is aborted in the
engine at once: its KV blocks, its adapter slot and its admission slot are freed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import NamedTuple, TypeVar

from starlette.requests import ClientDisconnect, Request

from loraplex.api.context import ApiContext
from loraplex.api.request_log import LOG_CAPTURE
from loraplex.api.request_scope import ACCOUNT_ID, REQUEST_ID
from loraplex.core import RequestOutput, SamplingParams
from loraplex.logs import event

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class Delta(NamedTuple):
    """New output since the previous delta: text, and the counted tokens [start, end)."""

    text: str
    token_start: int
    token_end: int


class Generation:
    """Use `await Generation.start(...)`; then `complete()`, or `deltas()` / `text_deltas()` and
    `aclose()` (closing an unfinished generation aborts the request and frees its KV blocks)."""

    def __init__(self, ctx: ApiContext, prompt_token_ids: list[int], params: SamplingParams, adapter: str | None):
        self._ctx = ctx
        # the account salts the prefix cache: no tenant's cached prompt speeds up another's
        self._outputs = ctx.engine.generate(prompt_token_ids, params, adapter, cache_salt=ACCOUNT_ID.get() or "")
        self._started = time.perf_counter()
        self._first_token_at: float | None = None
        self._sent_chars = 0
        self._adapter = adapter
        self._request_id, self._account = REQUEST_ID.get(), ACCOUNT_ID.get()
        self._log_capture = LOG_CAPTURE.get()  # set by the route when this request is logged
        self._ended = False
        self._sent_tokens = 0
        self.num_prompt_tokens = len(prompt_token_ids)
        self.output: RequestOutput | None = None

    @classmethod
    async def start(cls, ctx: ApiContext, prompt_token_ids: list[int], params: SamplingParams,
                    adapter: str | None, request: Request | None = None) -> Generation:
        """Queue the request and wait for its first output. If the client of `request` leaves
        meanwhile, the request is aborted and ClientDisconnect raised."""
        gen = cls(ctx, prompt_token_ids, params, adapter)
        try:
            await until_disconnect(request, gen._advance())
        except BaseException:
            await gen.aclose()
            raise
        return gen

    async def complete(self, request: Request | None = None) -> RequestOutput:
        """Run to the end (closing the generation, also on failure); the final output. If the
        client of `request` disconnects first, the request is aborted (its KV blocks freed at
        once) and ClientDisconnect raised."""
        try:
            return await until_disconnect(request, self._run_to_end())
        finally:
            await self.aclose()

    async def _run_to_end(self) -> RequestOutput:
        while not self.output.finished:
            await self._advance()
        return self.output

    async def deltas(self) -> AsyncIterator[Delta]:
        """What is new since the previous delta (new text or new counted tokens), until the
        request finishes; the last delta holds whatever was left (possibly nothing)."""
        while True:
            out = self.output
            text, tokens = out.text[self._sent_chars:], max(out.num_generated_tokens, self._sent_tokens)
            if text or tokens > self._sent_tokens or out.finished:
                yield Delta(text, self._sent_tokens, tokens)
                self._sent_chars, self._sent_tokens = self._sent_chars + len(text), tokens
            if out.finished:
                return
            await self._advance()

    async def text_deltas(self) -> AsyncIterator[str]:
        """New text since the previous delta (non-empty), until the request finishes."""
        async for delta in self.deltas():
            if delta.text:
                yield delta.text

    async def aclose(self) -> None:
        await self._outputs.aclose()
        self._end("abort")  # a no-op when it had ended already

    @property
    def num_completion_tokens(self) -> int:
        """Generated tokens, not counting a final end-of-sequence token (as OpenAI and vLLM do)."""
        return self.output.num_generated_tokens

    def usage(self) -> dict:
        completion = self.num_completion_tokens
        return {"prompt_tokens": self.num_prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.num_prompt_tokens + completion}

    async def _advance(self) -> None:
        try:
            out = await anext(self._outputs)
        except Exception:
            if self.output is None:  # refused before it was queued (queue full, can never run):
                self._ended = True   # the 4xx line says why; it was no generation
            else:
                self._end("error")
            raise
        if out.finish_reason == "error":
            self._end("error")
            raise out.error
        self.output = out
        self._observe(out)

    def _observe(self, out: RequestOutput) -> None:
        now = time.perf_counter()
        metrics = self._ctx.metrics
        if self._first_token_at is None and out.token_ids:
            self._first_token_at = now
            metrics.ttft.observe(now - self._started)
        if out.finished:
            n = len(out.token_ids)
            metrics.prompt_tokens.inc(self.num_prompt_tokens)
            metrics.generation_tokens.inc(n)
            if n > 1:
                metrics.tpot.observe((now - self._first_token_at) / (n - 1))
            self._end(out.finish_reason)

    def _end(self, finish_reason: str | None) -> None:
        """Once per generation: the per-finetune counters, the log line, and (when the request is
        logged) its record handed to the request logs' writer (non-blocking, never raises)."""
        if self._ended:
            return
        self._ended = True
        now = time.perf_counter()
        output_tokens = len(self.output.token_ids) if self.output is not None else 0
        self._ctx.metrics.count_finetune(self._adapter, self.num_prompt_tokens, output_tokens)
        ttft = None if self._first_token_at is None else round(self._first_token_at - self._started, 6)
        event(log, "generation", request_id=self._request_id, account=self._account, finetune=self._adapter,
              prompt_tokens=self.num_prompt_tokens, output_tokens=output_tokens, ttft_s=ttft,
              duration_s=round(now - self._started, 6), finish_reason=finish_reason)
        if self._log_capture is not None and self.output is not None:
            self._log_capture.record(self._adapter, self.output.text, self.num_prompt_tokens,
                                     self.num_completion_tokens, now - self._started, finish_reason)


async def until_disconnect(request: Request | None, work: Awaitable[_T]) -> _T:
    """The result of `work`, unless the client of `request` leaves first: then `work` is
    cancelled and ClientDisconnect raised. Both are unwound before this returns."""
    if request is None:
        return await work
    run, gone = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((run, gone), return_when=asyncio.FIRST_COMPLETED)
        if run.done():
            return run.result()
        gone.result()  # what the watcher raised, if it failed
        raise ClientDisconnect()
    finally:
        for task in (run, gone):
            task.cancel()
        await asyncio.gather(run, gone, return_exceptions=True)


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away. Reads ASGI messages past the (already read) body: the
    next one is the disconnect, or nothing until the response is sent."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
