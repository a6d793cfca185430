"""The README's quickstart, run as a new user would: the server started by the command `make serve
PORT=…` runs (on a free port, and a scratch data dir), the credentials it prints, then every block
between the quickstart markers in order — curl upload and run, the Cloudflare SDK, the OpenAI SDK."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from api_server import free_port
from loraplex.client import wait_until_healthy
from tiny_models import make_peft_adapter

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def quickstart_blocks() -> list[tuple[str, str]]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("<!-- quickstart:begin"):text.index("<!-- quickstart:end")]
    return re.findall(r"```(sh|python)\n(.*?)```", section, flags=re.S)


def serve_command(port: int) -> list[str]:
    """What `make serve PORT=port` runs once installed (make's dry run, the install taken as done)."""
    done = subprocess.run(["make", "-s", "-n", "-o", ".venv/.installed-runtime", "serve", f"PORT={port}"], cwd=REPO,
                          capture_output=True, text=True, check=True)
    (line,) = done.stdout.strip().splitlines()
    command = shlex.split(line)
    assert command[0] == ".venv/bin/loraplex"
    return [str(VENV_BIN / "loraplex"), *command[1:]]


def json_values(text: str) -> list:
    """The JSON documents curl printed back to back (without newlines between them)."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while at < len(text):
        value, at = decoder.raw_decode(text, at)
        values.append(value)
        while at < len(text) and text[at].isspace():
            at += 1
    return values


@pytest.fixture
def user_dir(tmp_path, default_model_dir):
    """A folder with the user's adapter (random, for the default model) and the project's venv."""
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir)
    make_peft_adapter(base, tmp_path / "my-adapter", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    (tmp_path / ".venv").symlink_to(VENV_BIN.parent)
    data = tmp_path / "data"
    data.mkdir()
    (data / "models").symlink_to(default_model_dir.parent)  # the model is converted once per test data dir
    return tmp_path


def test_quickstart(user_dir):
    port = free_port()
    command = serve_command(port) + ["--data-dir", str(user_dir / "data"), "--log-level", "warning"]
    assert command[1:7] == ["serve", "--model", "default", "--dev-account", "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=user_dir)
    try:
        printed = {}
        for line in server.stdout:
            if m := re.match(r"\s*export (LORAPLEX_ACCOUNT_ID|LORAPLEX_API_TOKEN)=(\S+)", line):
                printed[m[1]] = m[2]
            if line.startswith("serving "):
                break
        assert set(printed) == {"LORAPLEX_ACCOUNT_ID", "LORAPLEX_API_TOKEN"}
        wait_until_healthy(f"http://127.0.0.1:{port}", server, 120)

        script = ["set -euo pipefail"]
        for i, (kind, code) in enumerate(quickstart_blocks()):
            code = code.replace("127.0.0.1:8787", f"127.0.0.1:{port}")
            code = code.replace("LORAPLEX_ACCOUNT_ID=…", f"LORAPLEX_ACCOUNT_ID={printed['LORAPLEX_ACCOUNT_ID']}")
            code = code.replace("LORAPLEX_API_TOKEN=…", f"LORAPLEX_API_TOKEN={printed['LORAPLEX_API_TOKEN']}")
            script.append(f"echo '=== block {i}'")
            script.append(code if kind == "sh" else f"python - <<'PYTHON'\n{code}PYTHON")
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
        done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=user_dir, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        outputs = [part.strip() for part in re.split(r"=== block \d+\n", done.stdout)[1:]]
        assert len(outputs) == 3
        uploads_and_run = json_values(outputs[0])
        assert [r["success"] for r in uploads_and_run] == [True, True, True]
        assert uploads_and_run[-1]["result"]["response"].strip()
        assert uploads_and_run[-1]["result"]["usage"]["completion_tokens"] <= 32
        assert outputs[1] and outputs[2]  # the Cloudflare and OpenAI SDKs' answers
    finally:
        server.terminate()
        server.wait(timeout=30)
