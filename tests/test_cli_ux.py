"""The client CLI as a user meets it, run as a subprocess: pointed at a closed port or at some other
HTTP service it says so in one line and exits 1 (no traceback); `run`'s sampling flags give what
the HTTP API gives for the same request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from api_server import LiveServer, free_port, server_options
from loraplex.models.default_model import CONVERTER_VERSION, DEFAULT_MODEL_NAME, MARKER_NAME
from tiny_models import make_tiny_model

LORAPLEX = str(Path(sys.executable).parent / "loraplex")
MODEL = "@cf/test/tiny-llama"
PROMPT = "The capital of France is"


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    return subprocess.run([LORAPLEX, *args], capture_output=True, text=True, env=base | (env or {}), timeout=300)


def assert_one_line_error(done: subprocess.CompletedProcess, needle: str) -> None:
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], done.stderr


CREDENTIALS = {"LORAPLEX_ACCOUNT_ID": "acc", "LORAPLEX_API_TOKEN": "tok"}


@pytest.mark.parametrize("command", [["run", MODEL, "hi"], ["run", MODEL, "hi", "--stream"], ["finetunes", "list"]])
def test_closed_port(command):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert_one_line_error(cli(*command, env=CREDENTIALS | {"LORAPLEX_URL": url}), f"no server answers at {url}")
    assert_one_line_error(cli(*command, "--url", url, env=CREDENTIALS), "connection refused")


class _NotLoraplex(BaseHTTPRequestHandler):
    """Another service on the port: HTML for GET, a JSON object that is no Workers AI envelope for POST."""

    def _answer(self, status: int, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._answer(404, "text/html", b"<html><body>Not Found</body></html>")

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._answer(200, "application/json", b'{"status": "ok", "data": []}')

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def other_service():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotLoraplex)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("command", [["run", MODEL, "hi"], ["run", MODEL, "hi", "--stream"], ["finetunes", "list"]])
def test_some_other_service_on_the_port(other_service, command):
    done = cli(*command, "--url", other_service, env=CREDENTIALS)
    assert_one_line_error(done, f"{other_service} answered HTTP")
    assert "not as a loraplex server does" in done.stderr


# --- `loraplex run` flags against a live server --------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama", model_dir)
    live = LiveServer.start(server_options(model_dir, tmp_path_factory.mktemp("data")))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def user(server):
    account_id, token = server.account("cli-user")
    return {"LORAPLEX_ACCOUNT_ID": account_id, "LORAPLEX_API_TOKEN": token, "LORAPLEX_URL": server.url}


def api_run(server, user, **body) -> str:
    response = httpx.post(f"{server.url}/client/v4/accounts/{user['LORAPLEX_ACCOUNT_ID']}/ai/run/{MODEL}",
                          json=body, headers={"Authorization": f"Bearer {user['LORAPLEX_API_TOKEN']}"}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["result"]["response"]


def run_cli(user, *flags: str, prompt: str = PROMPT) -> str:
    done = cli("run", MODEL, prompt, *flags, env=user)
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("\n")
    return done.stdout[:-1]


def test_greedy_temperature_0_equals_the_api(server, user):
    expected = api_run(server, user, prompt=PROMPT, temperature=0, max_tokens=12)
    assert run_cli(user, "--temperature", "0", "--max-tokens", "12") == expected


def test_max_tokens_and_raw(server, user):
    expected = api_run(server, user, prompt=PROMPT, raw=True, temperature=0, max_tokens=5)
    assert run_cli(user, "--raw", "--temperature", "0", "--max-tokens", "5") == expected
    chat = api_run(server, user, prompt=PROMPT, temperature=0, max_tokens=5)
    assert chat != expected  # --raw really skipped the chat template


def test_seed_reproduces_a_sampled_reply(server, user):
    flags = ("--temperature", "1.5", "--seed", "1234", "--max-tokens", "16")
    expected = api_run(server, user, prompt=PROMPT, temperature=1.5, seed=1234, max_tokens=16)
    assert run_cli(user, *flags) == expected == run_cli(user, *flags)


def test_system_prompt(server, user):
    messages = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": PROMPT}]
    expected = api_run(server, user, messages=messages, temperature=0, max_tokens=10)
    assert run_cli(user, "--system", "Answer in French.", "--temperature", "0", "--max-tokens", "10") == expected
    assert expected != api_run(server, user, prompt=PROMPT, temperature=0, max_tokens=10)
    assert_one_line_error(cli("run", MODEL, PROMPT, "--system", "x", "--raw", env=user), "--system")


def test_stream_prints_the_same_reply(server, user):
    expected = api_run(server, user, prompt=PROMPT, temperature=0, max_tokens=12)
    assert run_cli(user, "--stream", "--temperature", "0", "--max-tokens", "12") == expected


def test_server_refusal_is_one_line(server, user):
    assert_one_line_error(cli("run", MODEL, PROMPT, "--lora", "nope", env=user), "3037")
    assert_one_line_error(cli("run", MODEL, PROMPT, "--lora", "nope", "--stream", env=user), "3037")


# --- `loraplex model-path` ---------------------------------------------------------------------

def converted(data_dir: Path) -> Path:
    """A stand-in for a finished conversion under `data_dir` (its marker and config), so that the
    test does not convert 517 MB; the conversion itself is tested in test_default_model.py."""
    folder = data_dir / "models" / DEFAULT_MODEL_NAME
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / MARKER_NAME).write_text(json.dumps({"converter_version": CONVERTER_VERSION}))
    return folder


def test_model_path_prints_the_converted_folder(tmp_path, monkeypatch):
    """The folder under the data dir that the server loads: from --data-dir, $LORAPLEX_DATA_DIR, or
    else the default data dir under $HOME, the same one the offline LLM resolves "default" to."""
    from loraplex import env as loraplex_env
    from loraplex.engine.engine import resolve_model_dir

    flag = converted(tmp_path / "flag")
    done = cli("model-path", "--data-dir", str(tmp_path / "flag"))
    assert (done.returncode, done.stdout) == (0, f"{flag}\n"), done.stderr
    variable = converted(tmp_path / "variable")
    done = cli("model-path", env={"LORAPLEX_DATA_DIR": str(tmp_path / "variable")})
    assert (done.returncode, done.stdout) == (0, f"{variable}\n"), done.stderr
    home = tmp_path / "home"
    default = converted(home / ".local" / "share" / "loraplex")
    done = cli("model-path", env={"HOME": str(home)})
    assert (done.returncode, done.stdout) == (0, f"{default}\n"), done.stderr
    monkeypatch.delenv("LORAPLEX_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(home))
    assert resolve_model_dir("default", loraplex_env.data_dir()) == default
