"""What the fault tests (tests/test_faults.py) share: the tiny model's adapters and prompts, the
offline reference, HTTP helpers for one tenant, a `loraplex serve` subprocess that can be
SIGKILLed, a slow multipart upload, and streams held open by clients that walk away."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from api_server import LiveServer, free_port
from loraplex import LLM, SamplingParams
from loraplex.core import RequestOutput
from loraplex.client import wait_until_healthy

MODEL = "@cf/test/tiny-llama"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_SPECS = {  # name → PEFT config: mixed ranks and targets
    "alpha": dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR),
    "beta": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "gamma": dict(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"]),
    "delta": dict(r=8, lora_alpha=8, target_modules=["k_proj", "up_proj"]),
}
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "Dear tenant, your adapter"]
FILES = ("adapter_config.json", "adapter_model.safetensors")


class Reference:
    """The offline LLM (a KV cache large enough never to preempt) with every adapter added;
    memoizes greedy outputs, keyed (prompt, adapter, max_tokens)."""

    def __init__(self, model_dir: Path, adapters: dict[str, Path]):
        self.llm = LLM(str(model_dir), dtype="float32", device="cpu", max_loras=len(adapters),
                       kv_cache_memory=16 << 20)
        for name, folder in adapters.items():
            self.llm.add_lora(name, folder)
        self._outputs: dict[tuple, RequestOutput] = {}

    def outputs(self, jobs: list[tuple[str, str | None, int]]) -> list[RequestOutput]:
        """Greedy outputs of (prompt, adapter, max_tokens) jobs; the missing ones in one batch."""
        missing = [job for job in dict.fromkeys(jobs) if job not in self._outputs]
        if missing:
            params = [SamplingParams(max_tokens=max_tokens, temperature=0.0) for _, _, max_tokens in missing]
            prompts, loras = [prompt for prompt, _, _ in missing], [lora for _, lora, _ in missing]
            outs = self.llm.generate(prompts, params, lora=loras)
            self._outputs.update(zip(missing, outs))
        return [self._outputs[job] for job in jobs]

    def text(self, prompt: str, lora: str | None, max_tokens: int) -> str:
        return self.outputs([(prompt, lora, max_tokens)])[0].text


# --- HTTP helpers ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tenant:
    account_id: str
    token: str

    def client(self, url: str, timeout: float = 60) -> httpx.Client:
        return httpx.Client(base_url=f"{url}/client/v4/accounts/{self.account_id}/ai",
                            headers={"Authorization": f"Bearer {self.token}"}, timeout=timeout)


def run_body(prompt: str, lora: str | None = None, max_tokens: int = 12, stream: bool = False) -> dict:
    body = {"prompt": prompt, "raw": True, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    return body | ({"lora": lora} if lora else {})


def run(client: httpx.Client, prompt: str, lora: str | None = None, max_tokens: int = 12) -> httpx.Response:
    return client.post(f"/run/{MODEL}", json=run_body(prompt, lora, max_tokens))


def upload_finetune(client: httpx.Client, name: str, folder: Path) -> str:
    """Create finetune `name` and upload both files of `folder`; returns its id."""
    created = client.post("/finetunes", json={"model": MODEL, "name": name})
    assert created.status_code == 200, created.text
    finetune_id = created.json()["result"]["id"]
    for file_name in FILES:
        upload_asset(client, finetune_id, file_name, (folder / file_name).read_bytes(), expect=200)
    return finetune_id


def upload_asset(client: httpx.Client, finetune_id: str, file_name: str, data: bytes,
                 expect: int | None = None) -> httpx.Response:
    response = client.post(f"/finetunes/{finetune_id}/finetune-assets", data={"file_name": file_name},
                           files={"file": (file_name, data)})
    if expect is not None:
        assert response.status_code == expect, response.text
    return response


def error_code(response: httpx.Response) -> int:
    """The Workers AI error code of a refused request (asserting the envelope's shape)."""
    body = response.json()
    assert body["success"] is False and body["result"] is None, body
    assert len(body["errors"]) == 1 and body["errors"][0]["message"], body
    return body["errors"][0]["code"]


def assert_serves(response: httpx.Response, expected_text: str) -> None:
    assert response.status_code == 200, response.text
    assert response.json()["result"]["response"] == expected_text


def assert_unavailable(response: httpx.Response) -> None:
    """A clean "out of capacity, retry later": 503 and code 3040 in the envelope."""
    assert response.status_code == 503, response.text
    assert error_code(response) == 3040


def engine_call(server: LiveServer, fn):
    """Run fn(engine) on the engine thread of a live server (from the test's thread)."""
    return asyncio.run(server.ctx.engine.call(fn))


def slot_holders(server: LiveServer) -> dict[str, int]:
    """Adapter → running sequences holding its slot (all should be 0 when idle)."""
    return engine_call(server, lambda engine: dict(engine.adapters.slots._holders))


def assert_all_free(server: LiveServer) -> None:
    """Nothing queued, running or in flight; every KV block free; no slot held."""
    server.wait_idle(timeout_s=30)
    stats = server.ctx.engine.stats()
    assert (stats.waiting, stats.running, stats.kv_blocks_free) == (0, 0, stats.kv_blocks_total), stats
    assert server.ctx.engine.num_in_flight == 0
    assert not any(slot_holders(server).values()), slot_holders(server)


class ServeProcess:
    """`loraplex serve` in a subprocess on a fixed port and data dir; `kill()` sends SIGKILL and
    `start()` starts it again on both, as a supervisor restarting a crashed server would."""

    def __init__(self, model_dir: Path, data_dir: Path, log: Path, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None):
        """`extra_args`: more `loraplex serve` flags; `env`: variables added to this process's."""
        self.model_dir, self.data_dir, self.log = model_dir, data_dir, log
        self.extra_args, self.env = tuple(extra_args), env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60) -> None:
        script = shutil.which("loraplex", path=os.path.dirname(sys.executable))
        command = [script] if script else [sys.executable, "-m", "loraplex.cli"]
        command += ["serve", "--model", str(self.model_dir), "--model-name", MODEL, "--data-dir", str(self.data_dir),
                    "--port", str(self.port), "--dtype", "float32", "--device", "cpu", "--max-loras", "2",
                    "--log-level", "warning", *self.extra_args]
        env = None if self.env is None else os.environ | self.env
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        wait_until_healthy(self.url, self.proc, timeout_s, self.log)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def slow_multipart(file_name: str, data: bytes, started: threading.Event, chunk: int = 512):
    """A multipart upload body that trickles in (0.05 s per `chunk` bytes); sets `started` once
    part of the file has been sent."""
    boundary = "faultsboundary"
    yield (f'--{boundary}\r\nContent-Disposition: form-data; name="file_name"\r\n\r\n{file_name}\r\n'
           f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file_name}"\r\n'
           "Content-Type: application/octet-stream\r\n\r\n").encode()
    for i in range(0, len(data), chunk):
        yield data[i:i + chunk]
        if i >= 2 * chunk:
            started.set()
        time.sleep(0.05)
    yield f"\r\n--{boundary}--\r\n".encode()


class SlowUpload(threading.Thread):
    """Streams `file_name` slowly into a finetune, in a thread; `started` is set once part of
    the file is sent, `outcome` holds the response or the transport error."""

    def __init__(self, server: ServeProcess, tenant: Tenant, finetune_id: str, file_name: str, data: bytes):
        super().__init__()
        self.server, self.tenant, self.finetune_id = server, tenant, finetune_id
        self.file_name, self.data = file_name, data
        self.started, self.outcome = threading.Event(), {}

    def run(self) -> None:
        with self.tenant.client(self.server.url) as client:
            try:
                self.outcome["response"] = client.post(
                    f"/finetunes/{self.finetune_id}/finetune-assets",
                    content=slow_multipart(self.file_name, self.data, self.started),
                    headers={"Content-Type": "multipart/form-data; boundary=faultsboundary"})
            except httpx.TransportError as e:
                self.outcome["error"] = e


LONG = 200  # max_tokens of the streams that clients abandon


class StreamHold:
    """Keeps every stream from ending before its client left, however fast or slow the machine:
    once any request of `engine` has LONG - 1 tokens, the engine's steps run nothing (commands,
    aborts among them, still run between them) until `release()`; `held` tells the clients that
    no more events will come, so those still waiting for events leave."""

    def __init__(self, engine, monkeypatch):
        self.held, self._released = threading.Event(), threading.Event()
        step = engine.step

        def holding_step():
            if not self._released.is_set() and (self.held.is_set() or any(
                    len(seq.output_token_ids) >= LONG - 1 for seq in engine._sequences.values())):
                self.held.set()
                self._released.wait(0.01)
                return []
            return step()

        monkeypatch.setattr(engine, "step", holding_step)

    def release(self) -> None:
        self._released.set()


async def walk_away(client: httpx.AsyncClient, body: dict, events: int, cancel_after_s: float | None,
                    hold: StreamHold) -> int:
    """Stream a run; leave after `events` SSE events (0: once the headers arrived), or after
    `cancel_after_s` seconds whatever was received, or once the streams are held (no more
    events will come). Returns the events seen. The stream must not end first."""
    seen = 0

    async def read() -> None:
        nonlocal seen
        async with client.stream("POST", f"/run/{MODEL}", json=body) as response:
            assert response.status_code == 200
            if events == 0:
                return
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    assert line != "data: [DONE]", "the stream ended before the client left"
                    seen += 1
                    if seen == events:
                        return

    async def held() -> None:
        while not hold.held.is_set():
            await asyncio.sleep(0.01)

    reading, waiting = asyncio.ensure_future(read()), asyncio.ensure_future(held())
    try:
        await asyncio.wait((reading, waiting), timeout=cancel_after_s, return_when=asyncio.FIRST_COMPLETED)
        if reading.done():
            reading.result()  # its assertion, if it failed
    finally:
        for task in (reading, waiting):
            task.cancel()
        await asyncio.gather(reading, waiting, return_exceptions=True)
    return seen


async def hundred_walkaways(url: str, tenant: Tenant, streams: list, rng: random.Random, hold: StreamHold) -> list[int]:
    """100 clients at once over `streams` (prompt, adapter): most leave after 0-5 events, a fifth
    after a random moment (before or after the first event). Returns the events each one saw.
    The streams are released once every client has left."""
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    try:
        async with httpx.AsyncClient(base_url=f"{url}/client/v4/accounts/{tenant.account_id}/ai", limits=limits,
                                     headers={"Authorization": f"Bearer {tenant.token}"}, timeout=120) as client:
            clients = []
            for i in range(100):
                prompt, lora = streams[i % len(streams)]
                body = run_body(prompt, lora, max_tokens=LONG, stream=True)
                if i % 5 == 4:  # a fifth give up after a moment, whether or not the stream has begun
                    clients.append(walk_away(client, body, LONG, rng.uniform(0.05, 1.5), hold))
                else:
                    clients.append(walk_away(client, body, i % 6, None, hold))
            return await asyncio.gather(*clients)
    finally:
        hold.release()


