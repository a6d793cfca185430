"""The server's log as an operator reads it: `loraplex serve` run as a subprocess (tiny model, port
0), its stderr captured. One structured line per generation and per 4xx, adapter loads and
evictions per tier; after start-up nothing but those and uvicorn's access lines; JSON lines parse;
no prompt text and no API token ever reach the log; "serving … on URL" names the bound port; the
dev account's token is printed when it is created, not on later starts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cloudflare import Cloudflare

from loraplex.client import stop_process, wait_until_healthy
from tiny_models import make_peft_adapter, make_tiny_model

LORAPLEX = str(Path(sys.executable).parent / "loraplex")
MODEL = "tiny-llama"
SECRET = "zebra-quartz-secret-prompt"


class Served:
    """A `loraplex serve` subprocess; stdout and stderr go to files."""

    def __init__(self, model_dir: Path, data_dir: Path, log_dir: Path, log_format: str):
        self.out, self.err = log_dir / f"{log_format}.out", log_dir / f"{log_format}.err"
        command = [LORAPLEX, "serve", "--model", str(model_dir), "--model-name", MODEL, "--data-dir", str(data_dir),
                   "--port", "0", "--dev-account", "--log-format", log_format, "--device", "cpu",
                   "--dtype", "float32", "--kv-cache-memory", str(32 << 20), "--max-loras", "1",
                   "--adapter-host-cache", "1", "--adapter-disk-cache", "1"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(command, stdout=out, stderr=err, env=env)
        self.url = self._wait_for_url(log_format)
        wait_until_healthy(self.url, self.proc, 60, self.err)

    def _wait_for_url(self, log_format: str) -> str:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.proc.poll() is None:
            if log_format == "json":
                found = [json.loads(line)["url"] for line in self.err.read_text().splitlines()
                         if line.startswith("{") and json.loads(line)["message"] == "serving"]
            else:
                found = re.findall(r"^serving \S+ \(and \S+\) on (http://\S+)$", self.out.read_text(), flags=re.M)
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"the server did not say where it serves:\n{self.out.read_text()}{self.err.read_text()}")

    def stop(self) -> tuple[str, str]:
        stop_process(self.proc)
        return self.out.read_text(), self.err.read_text()


@pytest.fixture(scope="module")
def model_and_adapters(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("model")
    make_tiny_model("llama", root / "tiny")
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "tiny")
    for seed, name in enumerate(("one", "two")):
        make_peft_adapter(base, root / name, seed=seed, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return root


def exercise(url: str, account_id: str, token: str, adapters: Path) -> dict:
    """Upload two finetunes, run each (and the base model) with the secret prompt, make one 404;
    returns what the log must show: request ids and usages, finetune ids."""
    cf = Cloudflare(api_token=token, base_url=f"{url}/client/v4", max_retries=0)
    ids = {}
    for name in ("one", "two"):
        ids[name] = cf.ai.finetunes.create(account_id=account_id, model=MODEL, name=name).id
        for file_name in ("adapter_config.json", "adapter_model.safetensors"):
            with open(adapters / name / file_name, "rb") as f:
                cf.ai.finetunes.assets.create(ids[name], account_id=account_id, file=f, file_name=file_name)
    runs = []
    with httpx.Client(base_url=f"{url}/client/v4/accounts/{account_id}/ai",
                      headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        for lora in ("one", "two", "one", None):
            body = {"prompt": SECRET, "max_tokens": 4, "temperature": 0} | ({"lora": lora} if lora else {})
            response = client.post(f"/run/{MODEL}", json=body)
            assert response.status_code == 200, response.text
            runs.append((response.headers["x-request-id"], ids.get(lora), response.json()["result"]["usage"]))
        missing = client.post(f"/run/{MODEL}", json={"prompt": SECRET, "lora": "nope"})
        assert missing.status_code == 404
    return {"runs": runs, "refused": missing.headers["x-request-id"], "finetunes": ids}


def credentials(stdout: str) -> tuple[str, str]:
    return (re.search(r"export LORAPLEX_ACCOUNT_ID=(\S+)", stdout)[1],
            re.search(r"export LORAPLEX_API_TOKEN=(\S+)", stdout)[1])


@pytest.fixture(scope="module")
def json_run(model_and_adapters, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    data = tmp_path_factory.mktemp("data")
    server = Served(model_and_adapters / "tiny", data, logs, "json")
    try:
        account_id, token = credentials(server.out.read_text())
        expected = exercise(server.url, account_id, token, model_and_adapters)
    finally:
        out, err = server.stop()
    return {"out": out, "err": err, "account": account_id, "token": token, "data": data, **expected}


def records(err: str) -> list[dict]:
    return [json.loads(line) for line in err.splitlines()]  # every stderr line is one JSON object


def test_json_lines_parse_and_only_access_and_structured_lines_follow_start_up(json_run):
    lines = records(json_run["err"])
    serving = next(i for i, r in enumerate(lines) if r["message"] == "serving")
    assert lines[serving]["url"].startswith("http://127.0.0.1:") and not lines[serving]["url"].endswith(":0")
    shutdown = next(i for i, r in enumerate(lines) if r["message"] == "Shutting down")
    after = lines[serving + 1:shutdown]  # while it served
    assert after and all(r["logger"] == "uvicorn.access" or r["logger"].startswith("loraplex.") for r in after)
    access = [r for r in after if r["logger"] == "uvicorn.access"]
    assert {"client", "method", "path", "status"} <= set(access[0])
    assert any(r["method"] == "POST" and r["status"] == 404 for r in access)


def test_one_line_per_generation(json_run):
    generations = [r for r in records(json_run["err"]) if r["message"] == "generation"]
    assert len(generations) == len(json_run["runs"])
    by_id = {r["request_id"]: r for r in generations}
    for request_id, finetune, usage in json_run["runs"]:
        line = by_id[request_id]
        assert line["account"] == json_run["account"] and line["finetune"] == finetune
        assert (line["prompt_tokens"], line["output_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
        assert line["finish_reason"] == "length"
        assert 0 <= line["ttft_s"] <= line["duration_s"]


def test_refusals_are_logged_with_their_reason(json_run):
    refused = [r for r in records(json_run["err"]) if r["message"] == "refused"]
    line = next(r for r in refused if r["request_id"] == json_run["refused"])
    assert (line["status"], line["code"], line["account"]) == (404, 3037, json_run["account"])
    assert "nope" in line["reason"] and line["path"].endswith(f"/run/{MODEL}")


def test_adapter_loads_and_evictions_per_tier(json_run):
    lines = records(json_run["err"])
    finetunes = set(json_run["finetunes"].values())
    loaded = {(r["tier"], r["adapter"]) for r in lines if r["message"] == "adapter loaded"}
    evicted = {(r["tier"], r["adapter"]) for r in lines if r["message"] == "adapter evicted"}
    assert {(tier, f) for tier in ("disk", "host", "slot") for f in finetunes} <= loaded
    # one slot, 1-byte host and disk budgets: every adapter leaves every tier once it is unused
    assert {("slot", json_run["finetunes"]["one"])} <= evicted
    assert {(tier, f) for tier in ("host", "disk") for f in finetunes} <= evicted
    assert all(isinstance(r["bytes"], int) for r in lines if r["message"] == "adapter loaded")


def test_no_prompt_text_and_no_token_in_the_log(json_run):
    assert SECRET not in json_run["err"] and SECRET not in json_run["out"]
    assert json_run["token"] not in json_run["err"]


def test_text_format_and_the_dev_token_only_when_created(json_run, model_and_adapters, tmp_path):
    """A second start on the same data dir, in text format: the dev token is not printed again."""
    server = Served(model_and_adapters / "tiny", json_run["data"], tmp_path, "text")
    try:
        account_id, token = json_run["account"], json_run["token"]
        assert httpx.get(f"{server.url}/healthz").status_code == 200  # the port it announced is the bound one
        with httpx.Client(headers={"Authorization": f"Bearer {token}"}) as client:
            reply = client.post(f"{server.url}/client/v4/accounts/{account_id}/ai/run/{MODEL}",
                                json={"prompt": SECRET, "max_tokens": 2})
        assert reply.status_code == 200
    finally:
        out, err = server.stop()
    assert token not in out and token not in err
    assert f"dev account: export LORAPLEX_ACCOUNT_ID={account_id}" in out
    line = next(line for line in err.splitlines() if " loraplex.api.generation: generation " in line)
    assert f"request_id={reply.headers['x-request-id']}" in line and f"account={account_id}" in line
    assert "finetune=null" in line and "output_tokens=2" in line
    assert SECRET not in out + err
