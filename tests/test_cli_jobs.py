"""`loraplex jobs …` run as a subprocess against a live server, as a user meets it: create from a
JSONL path (uploaded first) or a file id, list, get, cancel, and `events --follow` — JSON lines
when piped, a progress bar on a terminal (a pseudo-terminal here); refusals in one line."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import threading

import pytest

from api_server import LiveServer, server_options
from test_cli_ux import LORAPLEX, assert_one_line_error, cli

MODEL = "@cf/test/tiny-llama"
DATA = "".join(json.dumps({"messages": [{"role": "user", "content": f"say {w}"},
                                        {"role": "assistant", "content": "ARR"}]}) + "\n" for w in ("one", "two"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    live = LiveServer.start(server_options(model_dir, tmp_path_factory.mktemp("data")))
    yield live
    live.stop()


@pytest.fixture
def user(server, request):
    account_id, token = server.account(request.node.name[:60])
    return {"LORAPLEX_ACCOUNT_ID": account_id, "LORAPLEX_API_TOKEN": token, "LORAPLEX_URL": server.url}


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(DATA)
    return path


def ok(done: subprocess.CompletedProcess) -> list[dict]:
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_create_from_a_path_follow_to_success_then_list_get(user, jsonl):
    (job,) = ok(cli("jobs", "create", str(jsonl), "--model", MODEL, "--suffix", "cli", "--seed", "3", "--epochs", "2",
                    "--batch-size", "1", "--rank", "4", "--alpha", "8", "--target-modules", "q_proj,v_proj", env=user))
    assert job["status"] == "queued" and job["training_file"].startswith("file-") and job["seed"] == 3
    hp = job["method"]["supervised"]["hyperparameters"]
    assert (hp["n_epochs"], hp["batch_size"], hp["rank"], hp["alpha"], hp["target_modules"]) == (
        2, 1, 4, 8, ["q_proj", "v_proj"])

    events = ok(cli("jobs", "events", job["id"], "--follow", "--poll-interval", "0.1", env=user))  # piped: JSON lines
    steps = [e["data"] for e in events if e["type"] == "metrics"]
    assert [(d["step"], d["total_steps"]) for d in steps] == [(s, 4) for s in range(1, 5)]
    assert all("eta_seconds" in d and "train_loss" in d for d in steps)
    done = ok(cli("jobs", "get", job["id"], env=user))[0]
    assert done["status"] == "succeeded" and events[-1]["message"] == f"the job has succeeded: {done['fine_tuned_model']}"
    assert len({e["id"] for e in events}) == len(events)  # each event once, oldest first
    assert ok(cli("jobs", "events", job["id"], env=user)) == events
    assert [j["id"] for j in ok(cli("jobs", "list", env=user))] == [job["id"]]
    assert cli("run", MODEL, "say one", "--lora", done["fine_tuned_model"].split(":")[-1], "--max-tokens", "2",
               env=user).returncode == 0


def test_create_from_a_file_id_and_cancel(user, jsonl):
    (first,) = ok(cli("jobs", "create", str(jsonl), "--model", MODEL, "--epochs", "1", env=user))
    (job,) = ok(cli("jobs", "create", first["training_file"], "--model", MODEL, "--epochs", "50", env=user))
    assert job["training_file"] == first["training_file"]
    cancel = cli("jobs", "cancel", job["id"], env=user)
    follow = cli("jobs", "events", job["id"], "--follow", "--poll-interval", "0.1", env=user)
    if cancel.returncode == 0:  # the usual outcome: it was queued or training
        assert json.loads(cancel.stdout)["status"] == "cancelled"
        assert_one_line_error(follow, f"job {job['id']} was cancelled")
        assert json.loads(follow.stdout.splitlines()[-1])["message"] == "the job was cancelled"
        assert_one_line_error(cli("jobs", "cancel", job["id"], env=user), "already cancelled")
    else:  # the trainer finished all 50 epochs first
        assert_one_line_error(cancel, "already succeeded")
        assert follow.returncode == 0


def test_follow_on_a_terminal_draws_a_progress_bar(user, jsonl):
    (job,) = ok(cli("jobs", "create", str(jsonl), "--model", MODEL, "--epochs", "3", "--batch-size", "1", env=user))
    base = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([LORAPLEX, "jobs", "events", job["id"], "--follow", "--poll-interval", "0.1"],
                            stdout=terminal, stderr=subprocess.PIPE, env=base | user)
    os.close(terminal)
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: _read(controller), b"")))
    reader.start()
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    reader.join(timeout=30)
    os.close(controller)
    screen = b"".join(chunks).decode().replace("\r\n", "\n")  # a terminal sends a newline as \r\n
    final = screen.split("\r")[-1]  # what the redrawn line shows last
    assert final.startswith("[" + "#" * 30 + "] 6/6 steps  loss ") and "ETA 0:00  succeeded" in final
    assert "fine_tuned_model: @cf/test/tiny-llama:ft-" in final
    assert '"object"' not in screen  # no JSON on a terminal


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # the terminal's other end closed
        return b""


def test_refusals_are_one_line(user, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n')
    assert_one_line_error(cli("jobs", "create", str(bad), "--model", MODEL, env=user), "line 1")
    assert_one_line_error(cli("jobs", "create", str(tmp_path / "none.jsonl"), "--model", MODEL, env=user),
                          "no such file")
    assert_one_line_error(cli("jobs", "create", "file-nope", "--model", MODEL, env=user), "no file 'file-nope'")
    assert_one_line_error(cli("jobs", "get", "ftjob-nope", env=user), "7000: no fine-tuning job")
    assert ok(cli("jobs", "list", env=user)) == []
