"""The `n` choices of one OpenAI-dialect request, and their `logprobs` in OpenAI's two shapes.

Each choice is its own engine request (its own Generation): they are admitted together (one
refused → all closed), started together, streamed interleaved (each chunk names its `index`),
and closed together. Token counts and logprobs leave out a final end-of-sequence token, which is
not in the text either.
"""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import AsyncIterator

from starlette.requests import Request

from loraplex.api.context import ApiContext
from loraplex.api.generation import Delta, Generation, until_disconnect
from loraplex.core import RequestOutput, SamplingParams
from loraplex.tokenizer import Tokenizer


class Choices:
    """Use `await Choices.start(...)`; then `complete()` or `deltas()`, and `aclose()`."""

    def __init__(self, gens: list[Generation]):
        self.gens = gens

    @classmethod
    async def start(cls, ctx: ApiContext, prompt_token_ids: list[int], params: list[SamplingParams],
                    adapter: str | None, request: Request | None) -> Choices:
        """One generation per SamplingParams, each up to its first output (ClientDisconnect if
        the client leaves first; every started one is closed on any failure)."""
        starts = [asyncio.ensure_future(Generation.start(ctx, prompt_token_ids, p, adapter)) for p in params]
        try:
            await until_disconnect(request, asyncio.gather(*starts))
        except BaseException:
            for task in starts:
                task.cancel()
            results = await asyncio.gather(*starts, return_exceptions=True)
            for gen in results:
                if isinstance(gen, Generation):
                    await gen.aclose()
            raise
        return cls([task.result() for task in starts])

    async def complete(self, request: Request | None) -> list[RequestOutput]:
        """Every choice run to its end (all closed afterwards, also on failure or disconnect)."""
        async def run_all() -> list[RequestOutput]:
            return list(await asyncio.gather(*(gen.complete() for gen in self.gens)))

        try:
            return await until_disconnect(request, run_all())
        finally:
            await self.aclose()

    async def deltas(self) -> AsyncIterator[tuple[int, Delta | None]]:
        """(choice index, delta) as they come, interleaved; (index, None) once a choice finished."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, gen: Generation) -> None:
            try:
                async for delta in gen.deltas():
                    await queue.put((index, delta))
                await queue.put((index, None))
            except Exception as e:  # handed to the reader
                await queue.put((index, e))

        tasks = [asyncio.ensure_future(pump(i, gen)) for i, gen in enumerate(self.gens)]
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                if item is None:
                    remaining -= 1
                yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def aclose(self) -> None:
        for gen in self.gens:
            await gen.aclose()

    def usage(self) -> dict:
        prompt = self.gens[0].num_prompt_tokens
        completion = sum(gen.num_completion_tokens for gen in self.gens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """`n` copies of `params`; with a seed, choice i draws from seed + i (or all n would match)."""
    out = []
    for i in range(n):
        seed = None if params.seed is None else (params.seed + i) % 2**63
        out.append(SamplingParams(**{**vars(params), "seed": seed}))
    return out


def token_label(tokenizer: Tokenizer, token_id: int) -> str:
    """A token as OpenAI shows it: its text, or `bytes:\\xNN…` when it is not whole UTF-8."""
    raw = tokenizer.token_bytes(token_id)
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _chat_entry(tokenizer: Tokenizer, token_id: int, logprob: float) -> dict:
    return {"token": token_label(tokenizer, token_id), "logprob": logprob,
            "bytes": list(tokenizer.token_bytes(token_id))}


def chat_logprobs(tokenizer: Tokenizer, out: RequestOutput, start: int, end: int) -> dict:
    """Chat completions' `logprobs` of the counted tokens [start, end) of `out`."""
    content = []
    for j in range(start, end):
        entry = _chat_entry(tokenizer, out.token_ids[j], out.logprobs[j])
        tops = out.top_logprobs[j].items() if out.top_logprobs else ()
        entry["top_logprobs"] = [_chat_entry(tokenizer, t, lp) for t, lp in tops]
        content.append(entry)
    return {"content": content, "refusal": None}


class CompletionLogprobs:
    """Completions' (legacy) `logprobs` of one choice, chunk by chunk: `text_offset` (characters
    of text before each token; a character split over tokens counts at its last byte) runs on
    across chunks."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.offset = 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def of(self, out: RequestOutput, start: int, end: int) -> dict:
        tokens, offsets, tops = [], [], []
        for j in range(start, end):
            tokens.append(token_label(self.tokenizer, out.token_ids[j]))
            offsets.append(self.offset)
            self.offset += len(self._utf8.decode(self.tokenizer.token_bytes(out.token_ids[j])))
            pairs = out.top_logprobs[j].items() if out.top_logprobs else ()
            tops.append({token_label(self.tokenizer, t): lp for t, lp in pairs})
        return {"tokens": tokens, "token_logprobs": list(out.logprobs[start:end]), "top_logprobs": tops,
                "text_offset": offsets}
