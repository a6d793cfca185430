"""Slow and idle clients against a live server, over raw sockets: the connection cap, the header
and body read timeouts, the keep-alive timeout, and quiet failed accepts. After each attack the
server must still serve the offline text. Nothing here measures time: short server timeouts make
the server act, and the tests wait (with generous deadlines) for what it does."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import httpx
import pytest

from api_server import LiveServer, server_options
from loraplex import LLM, SamplingParams
from loraplex.api import connections
from loraplex.config import HttpConfig
from error_log import ErrorLog

MODEL = "@cf/test/tiny-llama"
PROMPT = "The capital of France is"
CAP = 8
DEADLINE_S = 60  # what a wait may take at most on a loaded machine; never a measured figure


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    http = HttpConfig(max_connections=CAP, header_timeout_s=1.0, body_timeout_s=1.0, keep_alive_timeout_s=1.0)
    live = LiveServer.start(server_options(model_dir, tmp_path_factory.mktemp("data"), http=http))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def tenant(server):
    return server.account("limits")


@pytest.fixture(scope="module")
def expected_text(model_dir) -> str:
    llm = LLM(str(model_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20)
    return llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0))[0].text


def address(server: LiveServer) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def read_until_closed(conn: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (DEADLINE_S at most)."""
    conn.settimeout(DEADLINE_S)
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data


def open_connections(server: LiveServer) -> int:
    return len(server._server.server_state.connections)


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def assert_healthy(server: LiveServer, tenant: tuple[str, str], expected_text: str) -> None:
    """The server answers a normal generation with the offline text, and ends idle."""
    account_id, token = tenant
    no_reuse = httpx.Limits(max_keepalive_connections=0)  # (the server's keep-alive timeout is short)
    with httpx.Client(base_url=server.url, timeout=DEADLINE_S, limits=no_reuse) as client:
        assert client.get("/healthz").status_code == 200
        reply = client.post(f"/client/v4/accounts/{account_id}/ai/run/{MODEL}",
                            headers={"Authorization": f"Bearer {token}"},
                            json={"prompt": PROMPT, "raw": True, "max_tokens": 8, "temperature": 0})
    assert reply.status_code == 200, reply.text
    assert reply.json()["result"]["response"] == expected_text
    server.wait_idle(timeout_s=DEADLINE_S)


def test_slow_headers_hold_at_most_the_cap_and_are_timed_out(server, tenant, expected_text):
    """Slowloris: CAP connections that never finish their headers, then 4 more. The 4 are
    answered 503 / 3040 and closed at once; the CAP slow ones get 408 and are closed by the header
    timeout; then the server serves normally."""
    wait_for(lambda: open_connections(server) == 0, "the server to have no connection")
    with ErrorLog().watching() as errors:
        slow = [socket.create_connection(address(server)) for _ in range(CAP)]
        try:
            for conn in slow:
                conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            wait_for(lambda: open_connections(server) == CAP, f"{CAP} open connections")
            for _ in range(4):
                with socket.create_connection(address(server)) as extra:
                    refused = read_until_closed(extra)
                assert refused.startswith(b"HTTP/1.1 503 "), refused
                assert b'"code": 3040' in refused
            for conn in slow:
                timed_out = read_until_closed(conn)
                assert timed_out.startswith(b"HTTP/1.1 408 "), timed_out
        finally:
            for conn in slow:
                conn.close()
        wait_for(lambda: open_connections(server) == 0, "the slow connections to be gone")
        assert_healthy(server, tenant, expected_text)
    assert errors.messages() == []


def test_connections_that_send_nothing_are_closed(server, tenant, expected_text):
    """Half-open connections (connect, send nothing) are closed by the header timeout."""
    with ErrorLog().watching() as errors:
        idle = [socket.create_connection(address(server)) for _ in range(CAP)]
        try:
            for conn in idle:
                assert read_until_closed(conn).startswith(b"HTTP/1.1 408 ")
        finally:
            for conn in idle:
                conn.close()
        assert_healthy(server, tenant, expected_text)
    assert errors.messages() == []


def test_a_body_that_stops_arriving_is_dropped_and_its_request_never_runs(server, tenant, expected_text):
    """Headers promise 100 bytes of body, 10 come, then nothing: the body timeout closes the
    connection; the handler sees the client leave (no error logged), nothing reaches the engine."""
    account_id, token = tenant
    host, port = address(server)
    with ErrorLog().watching() as errors:
        with socket.create_connection((host, port)) as conn:
            conn.sendall((f"POST /client/v4/accounts/{account_id}/ai/run/{MODEL} HTTP/1.1\r\nHost: {host}\r\n"
                          f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                          "Content-Length: 100\r\n\r\n").encode() + b'{"prompt": ')
            assert read_until_closed(conn) == b""
        wait_for(lambda: open_connections(server) == 0, "the connection to be gone")
        assert server.ctx.engine.num_in_flight == 0
        assert_healthy(server, tenant, expected_text)
    assert errors.messages() == []


def test_idle_keep_alive_connection_is_closed_after_a_response(server, tenant, expected_text):
    host, port = address(server)
    with socket.create_connection((host, port)) as conn:
        conn.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        reply = read_until_closed(conn)  # the answer, then the keep-alive timeout closes it
    assert reply.startswith(b"HTTP/1.1 200 ") and b'"status":"ok"' in reply
    assert_healthy(server, tenant, expected_text)


def test_failed_accepts_are_logged_once_per_interval_not_once_each(caplog):
    """asyncio reports every failed accept (EMFILE) through the loop's exception handler, with a
    traceback; the server's handler turns a burst of them into one warning with a count."""
    loop = asyncio.new_event_loop()
    try:
        connections.quiet_accept_errors(loop)
        with caplog.at_level(logging.DEBUG):
            for _ in range(10_000):
                loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                             "exception": OSError(24, "Too many open files")})
        records = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(records) == 1 and records[0].levelno == logging.WARNING
        assert "accepting connections failed 1 time" in records[0].getMessage()
        caplog.clear()
        with caplog.at_level(logging.DEBUG):  # anything else still reaches the default handler
            loop.call_exception_handler({"message": "something else broke"})
        assert any("something else broke" in r.getMessage() for r in caplog.records)
    finally:
        loop.close()


def test_the_cap_is_lowered_to_fit_the_open_file_limit(monkeypatch):
    monkeypatch.setattr(connections.resource, "getrlimit", lambda _: (1024, 1024))
    assert connections.effective_max_connections(HttpConfig(max_connections=5000)) == 1024 - connections.FD_RESERVE
    assert connections.effective_max_connections(HttpConfig(max_connections=100)) == 100


@pytest.mark.parametrize("bad", [dict(max_connections=0), dict(header_timeout_s=0), dict(body_timeout_s=-1)])
def test_http_config_refuses_nonsense(bad):
    with pytest.raises(ValueError):
        HttpConfig(**bad)


def test_out_of_file_descriptors_the_server_refuses_quietly_and_recovers(model_dir, tmp_path):
    """`loraplex serve` with an open-file limit of 256 and `--max-connections 1000`: the cap is
    lowered to fit (and says so), 400 half-open connections at once are each refused or timed out,
    failed accepts are logged as warnings without a traceback, and the server then serves."""
    import resource
    import subprocess
    import sys

    from api_server import free_port
    from loraplex.client import stop_process, wait_until_healthy

    def low_fd_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    port, log_path = free_port(), tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "loraplex.cli", "serve", "--model", str(model_dir), "--data-dir", str(tmp_path / "d"),
           "--port", str(port), "--dtype", "float32", "--device", "cpu", "--kv-cache-memory", str(4 << 20),
           "--max-connections", "1000", "--header-timeout", "1", "--log-level", "warning"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=low_fd_limit)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, proc, timeout_s=120, log_path=log_path)
        conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(400)]
        try:
            for conn in conns:
                conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            answers = []
            for conn in conns:
                try:
                    answers.append(read_until_closed(conn)[:12])
                except ConnectionResetError:
                    answers.append(b"reset")
        finally:
            for conn in conns:
                conn.close()
        assert set(answers) <= {b"HTTP/1.1 503", b"HTTP/1.1 408", b"reset"}, set(answers)
        # (more than the cap may see a 408: connections that waited in the kernel's backlog are
        # accepted once the first ones were timed out)
        with httpx.Client(base_url=url, timeout=DEADLINE_S) as client:
            assert client.get("/healthz").status_code == 200
    finally:
        stop_process(proc)
    log_text = log_path.read_text(errors="replace")
    assert "max_connections 1000 lowered to 192" in log_text
    # a burst is accepted before the cap is checked, so descriptors can still run out for a moment:
    # then asyncio pauses accepting for a second, and the server logs one warning line, no traceback
    assert "Traceback" not in log_text and "ERROR" not in log_text, log_text[-3000:]
    assert "socket.accept() out of system resource" not in log_text  # asyncio's own report, one per failure
