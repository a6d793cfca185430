"""Ghost requests: clients that leave before their first token. Each one's request must be
aborted in the engine (KV blocks, adapter slot and admission slot freed) without waiting for a
token, whether it was streamed or not, in either dialect.

The engine is held (its step does nothing) while the clients connect, are admitted and leave, so
no token can ever come first: the test proves the disconnect alone frees everything, and it does
not depend on how fast the machine is."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from api_server import LiveServer, server_options
from loraplex import LLM, SamplingParams
from loraplex.core import RequestOutput

MODEL = "@cf/test/tiny-llama"
LONG_PROMPT = "Once upon a time, " * 22  # ~400 tokens of a 512-token context: a long prefill
PROMPT = "The capital of France is"
DEADLINE_S = 60


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    live = LiveServer.start(server_options(model_dir, tmp_path_factory.mktemp("data")))
    yield live
    live.stop()


class HeldEngine:
    """While held, the engine's step runs nothing (no prefill, no token); the engine thread
    still takes commands (admissions, aborts) between steps. Records every abort."""

    def __init__(self, server: LiveServer, monkeypatch):
        self.engine = server.ctx.engine.engine
        self.released = threading.Event()
        self.aborted: list[RequestOutput] = []
        step, abort = self.engine.step, self.engine.abort

        def held_step():
            if not self.released.is_set():
                self.released.wait(0.01)
                return []
            return step()

        def recording_abort(request_id: str):
            out = abort(request_id)
            if out is not None:
                self.aborted.append(out)
            return out

        monkeypatch.setattr(self.engine, "step", held_step)
        monkeypatch.setattr(self.engine, "abort", recording_abort)


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def raw_post(server: LiveServer, path: str, token: str, body: dict) -> socket.socket:
    """Send a whole POST (headers and body) on a new connection; the caller leaves by closing it."""
    host, port = server.url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    conn = socket.create_connection((host, int(port)))
    conn.sendall((f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data)
    return conn


def test_clients_gone_before_their_first_token_are_aborted_without_it(server, model_dir, monkeypatch):
    account_id, token = server.account("ghosts")
    ai = f"/client/v4/accounts/{account_id}/ai"
    run = dict(prompt=LONG_PROMPT, raw=True, max_tokens=16, temperature=0)
    chat = dict(model=MODEL, messages=[{"role": "user", "content": LONG_PROMPT}], max_tokens=16)
    requests = [  # (path, body, engine requests it makes)
        (f"{ai}/run/{MODEL}", run, 1),
        (f"{ai}/run/{MODEL}", run | {"stream": True}, 1),
        (f"{ai}/run/{MODEL}", {"messages": chat["messages"], "max_tokens": 16}, 1),
        (f"{ai}/v1/chat/completions", chat | {"n": 2}, 2),
        (f"{ai}/v1/chat/completions", chat | {"stream": True}, 1),
        (f"{ai}/v1/completions", dict(model=MODEL, prompt=LONG_PROMPT, max_tokens=16, stream=True, n=3), 3),
    ]
    engine_requests = sum(n for _, _, n in requests)
    held = HeldEngine(server, monkeypatch)
    conns = [raw_post(server, path, token, body) for path, body, _ in requests]
    try:
        wait_for(lambda: server.ctx.engine.num_in_flight == engine_requests, "every request to be admitted")
        wait_for(lambda: server.ctx.engine.stats().waiting == engine_requests, "every request to reach the engine")
    finally:
        for conn in conns:
            conn.close()  # all leave before any token: the engine has not run a single step
    wait_for(lambda: server.ctx.engine.num_in_flight == 0, "the admission slots to be freed")
    wait_for(lambda: len(held.aborted) == engine_requests, "every request to be aborted")
    stats = server.ctx.engine.stats()
    assert (stats.waiting, stats.running, stats.kv_blocks_free) == (0, 0, stats.kv_blocks_total), stats
    assert all(out.finish_reason == "abort" and out.token_ids == [] for out in held.aborted)
    assert not held.released.is_set()  # (all of it happened with the engine held)

    held.released.set()
    expected = LLM(str(model_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20).generate(
        [PROMPT], SamplingParams(max_tokens=8, temperature=0))[0].text
    with httpx.Client(base_url=server.url + ai, headers={"Authorization": f"Bearer {token}"},
                      timeout=DEADLINE_S) as client:
        reply = client.post(f"/run/{MODEL}", json={"prompt": PROMPT, "raw": True, "max_tokens": 8, "temperature": 0})
    assert reply.status_code == 200, reply.text
    assert reply.json()["result"]["response"] == expected
    server.wait_idle(timeout_s=DEADLINE_S)
