"""A loraplex server on loopback for the API tests: uvicorn in a thread of the test process, so
the tests can also look at the engine's state (KV blocks, slots) directly."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from loraplex.api.app import create_app
from loraplex.api.connections import uvicorn_config
from loraplex.api.context import ApiContext
from loraplex.api.server import ServerOptions, build_context
from loraplex.config import engine_config, engine_settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    ctx: ApiContext
    app: FastAPI
    url: str
    _server: uvicorn.Server
    _thread: threading.Thread

    @classmethod
    def start(cls, options: ServerOptions) -> LiveServer:
        ctx = build_context(options)
        return cls.serve(ctx, create_app(ctx), options)

    @classmethod
    def serve(cls, ctx: ApiContext, app: FastAPI, options: ServerOptions) -> LiveServer:
        """Serve an app built elsewhere (e.g. the scale-out ingress, tests/scaleout_server.py)."""
        port = free_port()
        server = uvicorn.Server(uvicorn_config(app, options.http, "127.0.0.1", port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return cls(ctx, app, f"http://127.0.0.1:{port}", server, thread)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)

    def account(self, name: str) -> tuple[str, str]:
        return self.ctx.registry.create_account(name)

    def openai_client(self, account_name: str):
        """The OpenAI SDK, as a new account `account_name`, on this server's OpenAI dialect (no retries)."""
        from openai import OpenAI

        account_id, token = self.account(account_name)
        return OpenAI(api_key=token, base_url=f"{self.url}/client/v4/accounts/{account_id}/ai/v1", max_retries=0)

    def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Until no request is queued or running and every KV block is free."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            s = self.ctx.engine.stats()
            if s.waiting == s.running == 0 and s.kv_blocks_free == s.kv_blocks_total:
                return
            time.sleep(0.02)
        raise AssertionError(f"the engine did not become idle: {self.ctx.engine.stats()}")


def server_options(model_dir: Path, data_dir: Path, **overrides) -> ServerOptions:
    """Options for a test server on `model_dir`; overrides name engine settings (config.engine_settings)
    or ServerOptions fields."""
    settings = dict(dtype="float32", device="cpu", max_loras=2, kv_cache_memory=32 << 20)
    settings |= {name: overrides.pop(name) for name in list(overrides) if name in engine_settings()}
    defaults = dict(data_dir=data_dir, engine=engine_config(str(model_dir), **settings), model_name="@cf/test/tiny-llama")
    return ServerOptions(**(defaults | overrides))
