"""Deleting a finetune while it is uploaded to or used, and a clean shutdown, over HTTP against a
live server (issue 18, items 8 and 9). Interleavings are forced with gates inside the server
process (never with sleeps), then the server is checked to be healthy and correct."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from api_server import LiveServer, free_port, server_options
from loraplex.adapters.storage import key_for
from loraplex.client import stop_process, wait_until_healthy
from upload_client import CONFIG, MODEL, WEIGHTS, ErrorLog, Tenant, assert_error, make_model_and_adapter

WAIT_S = 60  # upper bound on waiting for a condition (never asserted on: a slow machine just waits longer)


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_model_and_adapter(tmp_path_factory)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(files, tmp_path_factory, request):
    """A live server on each registry backend (its upload locks are also PostgreSQL advisory locks there)."""
    if request.param == "sqlite":
        live = LiveServer.start(server_options(files[0], tmp_path_factory.mktemp("data")))
        yield live
        live.stop()
        return
    with request.getfixturevalue("postgres_databases")() as url:
        live = LiveServer.start(server_options(files[0], tmp_path_factory.mktemp("data"), registry=url))
        yield live
        live.stop()
        live.ctx.registry.close()


def in_thread(fn) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    return thread, result


def test_upload_racing_a_delete_leaves_no_object(server, files, monkeypatch):
    """Was: an upload that stored its object just before the finetune was deleted left the
    object in the store, referenced by nothing, outside every quota. Now the delete wins: the
    upload is refused 404/3037 and its object removed."""
    tenant = Tenant.open(server, "racer", MODEL)
    other = Tenant.open(server, "racer-2", MODEL)  # a second connection for the concurrent upload
    other.client.headers["Authorization"] = tenant.client.headers["Authorization"]
    other.client.base_url = tenant.client.base_url
    weights = (files[1] / WEIGHTS).read_bytes()
    weights_key = key_for(hashlib.sha256(weights).hexdigest())
    config_key = key_for(hashlib.sha256((files[1] / CONFIG).read_bytes()).hexdigest())
    finetune = tenant.create_id("raced")
    assert tenant.send(finetune, CONFIG, (files[1] / CONFIG).read_bytes()).status_code == 200

    stored, release = threading.Event(), threading.Event()
    real_put = server.ctx.store.put_file

    def gated_put(path, **kwargs):
        info = real_put(path, **kwargs)
        if Path(path).read_bytes() == weights:  # (the staged name is an implementation detail)
            stored.set()
            assert release.wait(WAIT_S)
        return info

    monkeypatch.setattr(server.ctx.store, "put_file", gated_put)
    with ErrorLog().watching() as log:
        upload, answer = in_thread(lambda: other.send(finetune, WEIGHTS, weights))
        assert stored.wait(WAIT_S)
        assert server.ctx.store.exists(weights_key)  # the object is in, not yet recorded
        assert tenant.client.delete(f"/finetunes/{finetune}").status_code == 200
        release.set()
        upload.join(WAIT_S)
        assert_error(answer[0], 404, 3037)
    assert log.messages() == []
    assert not server.ctx.store.exists(weights_key) and not server.ctx.store.exists(config_key)
    # healthy afterwards: the same bytes upload again, and serve
    monkeypatch.undo()
    again = tenant.create_id("raced")
    tenant.send_folder(again, files[1])
    assert tenant.run(again).status_code == 200
    assert server.ctx.store.exists(weights_key)
    tenant.close()
    other.close()


def engine_folders(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "adapter-cache").glob("engine-*"))


def test_deleting_a_finetune_in_use_lets_its_request_finish_then_forgets_it(server, files, monkeypatch):
    """Was: a finetune deleted while a request used it stayed registered in the engine, with its
    downloaded copy on disk, for the life of the process. Now the request finishes with the
    adapter's output; then the engine forgets the adapter and its disk copy goes."""
    tenant = Tenant.open(server, "in-use", MODEL)
    second = Tenant.open(server, "in-use-2", MODEL)
    second.client.headers["Authorization"] = tenant.client.headers["Authorization"]
    second.client.base_url = tenant.client.base_url
    finetune = tenant.create_id("busy")
    tenant.send_folder(finetune, files[1])
    baseline = tenant.run(finetune, max_tokens=24).json()["result"]["response"]
    assert baseline != tenant.run(None, max_tokens=24).json()["result"]["response"]  # the adapter matters
    engine = server.ctx.engine.engine
    (folder,) = engine_folders(server.ctx.upload_dir.parent)
    assert any(p.name.startswith(finetune) for p in folder.iterdir())  # its downloaded copy

    added, release = threading.Event(), threading.Event()
    real_add = engine.add_request

    def gated_add(request_id, prompt, params, lora=None, cache_salt=""):  # runs on the engine thread
        real_add(request_id, prompt, params, lora, cache_salt)
        if lora == finetune:
            added.set()
            assert release.wait(WAIT_S)

    monkeypatch.setattr(engine, "add_request", gated_add)
    with ErrorLog().watching() as log:
        running, answer = in_thread(lambda: second.run(finetune, max_tokens=24))
        assert added.wait(WAIT_S)  # the request is in the engine, which is held
        deleting, deleted = in_thread(lambda: tenant.client.delete(f"/finetunes/{finetune}"))
        wait_for(lambda: server.ctx.engine._commands.qsize() > 0, "the delete to reach the engine")
        release.set()  # the engine adds the request, then sees the delete while the request runs
        running.join(WAIT_S)
        deleting.join(WAIT_S)
    assert log.messages() == []
    assert deleted[0].status_code == 200
    assert answer[0].status_code == 200 and answer[0].json()["result"]["response"] == baseline
    wait_for(lambda: finetune not in engine.adapters.names, "the engine to forget the adapter")
    # (the cache deletes folders on its worker threads)
    wait_for(lambda: not any(p.name.startswith(finetune) for p in folder.iterdir()), "its disk copy to go")
    assert_error(tenant.run(finetune), 404, 3037)
    assert server.ctx.engine.stats().running == 0
    tenant.close()
    second.close()


def test_clean_shutdown_removes_the_engine_download_folder(files, tmp_path):
    """Was: `loraplex serve` stopped by SIGTERM left DATA_DIR/adapter-cache/engine-* behind with a
    copy of every adapter it had fetched. A process-level test: a real `loraplex serve`."""
    data_dir = tmp_path / "data"
    printed = tmp_path / "account.json"
    script = shutil.which("loraplex", path=os.path.dirname(sys.executable))
    command = [script] if script else [sys.executable, "-m", "loraplex.cli"]
    made = subprocess.run(command + ["accounts", "create", "shutdown", "--data-dir", str(data_dir)],
                          capture_output=True, text=True, check=True)
    account = json.loads(made.stdout)
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command + ["serve", "--model", str(files[0]), "--model-name", MODEL, "--data-dir",
                                           str(data_dir), "--port", str(port), "--dtype", "float32", "--device", "cpu",
                                           "--max-loras", "2", "--kv-cache-memory", str(32 << 20),
                                           "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, proc, WAIT_S, log)
        client = httpx.Client(base_url=f"{url}/client/v4/accounts/{account['account_id']}/ai",
                              headers={"Authorization": f"Bearer {account['token']}"}, timeout=120)
        tenant = Tenant(client, account["account_id"], MODEL)
        finetune = tenant.create_id("cached")
        tenant.send_folder(finetune, files[1])
        assert tenant.run(finetune).status_code == 200
        (folder,) = engine_folders(data_dir)
        assert any(p.name.startswith(finetune) for p in folder.iterdir())
        client.close()
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down cleanly, then re-raises the signal: so no atexit hook runs at all
        assert proc.wait(WAIT_S) in (0, -signal.SIGTERM), log.read_text(errors="replace")[-3000:]
    finally:
        stop_process(proc)
    assert engine_folders(data_dir) == []
    assert "Traceback" not in log.read_text(errors="replace")
