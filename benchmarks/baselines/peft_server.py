"""Baseline LoRA server written the way most users would: FastAPI + uvicorn + transformers + peft.

It speaks the same route as loraplex's Workers AI dialect, so one client drives every server:

    POST /client/v4/accounts/{account_id}/ai/run/{model_name}
    {"prompt": str, "raw": bool, "max_tokens": int, "temperature": 0, "stream": bool, "lora": name | null}

Non-stream: {"result": {"response", "usage"}, "success": true, "errors": [], "messages": []}.
Stream: `text/event-stream`, `data: {"response": "<delta>"}` per token, a last event that also
carries `usage`, then `data: [DONE]`. Any account id, model name and Authorization are accepted;
decoding is always greedy. `GET /healthz` answers 200 once the model is loaded.

Modes:
- naive: one request at a time (a single worker thread); `set_adapter(name)` per request, or the
  adapters disabled for a base request; `generate` for that one prompt, streamed token by token.
- batched: static batches with peft's mixed-adapter `generate(..., adapter_names=[...])`
  ("__base__" = no adapter): up to --max-batch queued requests (whatever is waiting, plus what
  arrives within a short window), left-padded, decoded together up to the longest max_tokens. Each
  request's tokens are streamed as its row produces them; requests arriving meanwhile wait for
  the whole batch to finish.

    python benchmarks/baselines/peft_server.py --model HF_FOLDER --adapters DIR --port P --mode naive|batched [--max-batch 16]

DIR holds one PEFT folder per adapter; the folder name is the adapter name.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, nullcontext
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from peft import PeftModel
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in adapter_names
BATCH_WINDOW_S = 0.02  # how long a new batch waits for more requests after its first one


class RunBody(BaseModel):
    prompt: str
    raw: bool = False
    max_tokens: int = 256
    temperature: float = 0.0
    stream: bool = False
    lora: str | None = None


class Job:
    """One request in flight. Tokens arrive on the worker thread (`on_token`, `finish`, `fail`);
    what the HTTP handler reads comes out of `events` on the event loop: text deltas (str), then one
    final dict, either {"usage": ...} or {"error": message}. `cancelled` is set by the handler
    when the client goes away; the worker then stops (or never starts) decoding it."""

    def __init__(self, prompt_ids: list[int], max_tokens: int, adapter: str, tokenizer, loop):
        self.prompt_ids, self.max_tokens, self.adapter = prompt_ids, max_tokens, adapter
        self.tokenizer, self.loop = tokenizer, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.generated: list[int] = []
        self.sent_text = ""
        self.done = False
        self.cancelled = False

    def _emit(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def on_token(self, token_id: int) -> None:
        if self.done or self.cancelled:
            return
        self.generated.append(token_id)
        if token_id == self.tokenizer.eos_token_id or len(self.generated) >= self.max_tokens:
            self.finish()
            return
        text = self.tokenizer.decode(self.generated, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # hold back an incomplete UTF-8 sequence
            self._emit_delta(text)

    def _emit_delta(self, text: str) -> None:
        if len(text) > len(self.sent_text):
            self._emit(text[len(self.sent_text) :])
            self.sent_text = text

    def finish(self) -> None:
        if self.done:
            return
        self._emit_delta(self.tokenizer.decode(self.generated, skip_special_tokens=True))
        self.done = True
        n_prompt, n_out = len(self.prompt_ids), len(self.generated)
        self._emit({"usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}})

    def fail(self, message: str) -> None:
        if not self.done:
            self.done = True
            self._emit({"error": message})


class RowStreamer(BaseStreamer):
    """Hands row i of each decoding step's tokens to jobs[i]; `generate`'s first `put` (the prompts) is skipped."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for job, token in zip(self.jobs, value.reshape(-1).tolist()):
            job.on_token(token)

    def end(self) -> None:
        for job in self.jobs:
            job.finish()


class StopFinishedRows(StoppingCriteria):
    """Marks the rows whose job is done or cancelled as finished (all done: `generate` returns)."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.tensor([job.done or job.cancelled for job in self.jobs], dtype=torch.bool)


class Generator:
    """Runs `generate` for a list of jobs on one worker thread (so at most one batch at a time)."""

    def __init__(self, model: PeftModel, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.executor = ThreadPoolExecutor(max_workers=1)

    def start(self, jobs: list[Job], mixed: bool) -> asyncio.Future:
        """Queue `jobs` for the worker thread; `mixed` = one batch of mixed adapters via `adapter_names`."""
        return asyncio.get_running_loop().run_in_executor(self.executor, self._generate, jobs, mixed)

    def _generate(self, jobs: list[Job], mixed: bool) -> None:
        jobs = [job for job in jobs if not job.cancelled]
        if not jobs:
            return
        width = max(len(job.prompt_ids) for job in jobs)
        ids = torch.tensor([[self.pad_id] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs])
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs])
        adapter_context, adapter_kwargs = self._select_adapters(jobs, mixed)
        try:
            with torch.inference_mode(), adapter_context:
                self.model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=max(j.max_tokens for j in jobs),
                    do_sample=False, pad_token_id=self.pad_id, streamer=RowStreamer(jobs),
                    stopping_criteria=StoppingCriteriaList([StopFinishedRows(jobs)]), **adapter_kwargs,
                )
        except Exception as exc:  # noqa: BLE001 - any failure ends these requests, not the server
            for job in jobs:
                job.fail(f"{type(exc).__name__}: {exc}")

    def _select_adapters(self, jobs: list[Job], mixed: bool):
        """(context manager, extra generate kwargs) that apply the jobs' adapters."""
        if mixed:
            return nullcontext(), {"adapter_names": [job.adapter for job in jobs]}
        (job,) = jobs
        if job.adapter == BASE_ADAPTER:
            return self.model.disable_adapter(), {}
        self.model.set_adapter(job.adapter)
        return nullcontext(), {}


class NaiveScheduler:
    """Each request is generated alone, in arrival order."""

    def __init__(self, generator: Generator):
        self.generator = generator

    async def submit(self, job: Job) -> None:
        self.generator.start([job], mixed=False)  # the single worker thread runs them in order

    async def run_forever(self) -> None:
        return None


class StaticBatchScheduler:
    """Takes up to `max_batch` waiting jobs (waiting `BATCH_WINDOW_S` for more after the first),
    generates them as one static batch, and only then looks at the queue again."""

    def __init__(self, generator: Generator, max_batch: int):
        self.generator, self.max_batch = generator, max_batch
        self.queue: asyncio.Queue[Job] = asyncio.Queue()

    async def submit(self, job: Job) -> None:
        self.queue.put_nowait(job)

    async def next_batch(self) -> list[Job]:
        batch = [await self.queue.get()]
        deadline = asyncio.get_running_loop().time() + BATCH_WINDOW_S
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def run_forever(self) -> None:
        while True:
            await self.generator.start(await self.next_batch(), mixed=True)


def error_response(status: int, code: int, message: str) -> JSONResponse:
    body = {"result": None, "success": False, "errors": [{"code": code, "message": message}], "messages": []}
    return JSONResponse(body, status_code=status)


async def stream_events(job: Job):
    """SSE lines for one job, ending with `[DONE]` (or an error event, with no `[DONE]`). If the
    client disconnects first, the job is cancelled."""
    try:
        while True:
            item = await job.events.get()
            if isinstance(item, str):
                yield f"data: {json.dumps({'response': item})}\n\n"
            elif "usage" in item:
                yield f"data: {json.dumps({'response': '', 'usage': item['usage']})}\n\n"
                yield "data: [DONE]\n\n"
                return
            else:
                yield f"data: {json.dumps({'errors': [{'code': 3040, 'message': item['error']}]})}\n\n"
                return
    finally:
        job.cancelled = True  # harmless once done; stops the decoding of an abandoned request


async def collect(job: Job) -> JSONResponse:
    pieces = []
    while isinstance(item := await job.events.get(), str):
        pieces.append(item)
    if "error" in item:
        return error_response(500, 3040, item["error"])
    result = {"response": "".join(pieces), "usage": item["usage"]}
    return JSONResponse({"result": result, "success": True, "errors": [], "messages": []})


def build_app(model: PeftModel, tokenizer, mode: str, max_batch: int) -> FastAPI:
    generator = Generator(model, tokenizer)
    scheduler = NaiveScheduler(generator) if mode == "naive" else StaticBatchScheduler(generator, max_batch)
    adapters = set(model.peft_config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(scheduler.run_forever())
        yield
        task.cancel()

    app = FastAPI(lifespan=lifespan)

    @app.get("/healthz")
    async def healthz():
        return {"ok": True}

    @app.post("/client/v4/accounts/{account_id}/ai/run/{model_name:path}")
    async def run(account_id: str, model_name: str, body: RunBody):
        if body.lora is not None and body.lora not in adapters:
            return error_response(404, 3037, f"finetune {body.lora!r} not found")
        if body.max_tokens < 1:
            return error_response(400, 5004, "max_tokens must be at least 1")
        if body.raw:
            prompt_ids = tokenizer(body.prompt)["input_ids"]
        else:
            messages = [{"role": "user", "content": body.prompt}]
            prompt_ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
        job = Job(prompt_ids, body.max_tokens, body.lora or BASE_ADAPTER, tokenizer, asyncio.get_running_loop())
        await scheduler.submit(job)
        if body.stream:
            return StreamingResponse(stream_events(job), media_type="text/event-stream")
        return await collect(job)

    return app


def load_model(model_dir: Path, adapters_dir: Path) -> PeftModel:
    """The base model with every adapter folder under `adapters_dir` loaded (named after its folder)."""
    folders = sorted(p for p in adapters_dir.iterdir() if (p / "adapter_config.json").is_file())
    if not folders:
        raise SystemExit(f"no PEFT adapter folders in {adapters_dir}")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, folders[0], adapter_name=folders[0].name)
    for folder in folders[1:]:
        model.load_adapter(folder, adapter_name=folder.name)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="a Hugging Face model folder")
    parser.add_argument("--adapters", required=True, type=Path, help="a folder of PEFT adapter folders")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--mode", choices=["naive", "batched"], default="naive")
    parser.add_argument("--max-batch", type=int, default=16)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    app = build_app(load_model(args.model, args.adapters), tokenizer, args.mode, args.max_batch)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
