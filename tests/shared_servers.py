"""Two live servers in two processes sharing one PostgreSQL registry (and so the fine-tuning
state beside it) and one object store (a `file://` folder): the layout of a scale-out deployment.
One is a LiveServer in this process (its context is at hand: registry, stores, caches), the other
`loraplex serve --registry URL` in a subprocess (two servers in one process would share in-process
state and hide a missing cross-process rule)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from api_server import LiveServer, server_options
from fault_helpers import ServeProcess


@contextmanager
def two_servers(model_dir: Path, tmp_path: Path, postgres_url: str, serve_args: tuple[str, ...] = (), **options):
    """(LiveServer, ServeProcess), each with its own data dir and engine, on one registry and one
    object store; `serve_args` go to the subprocess's `loraplex serve`, `options` (ServerOptions
    fields or engine settings) to the LiveServer. Both stopped when the block ends."""
    store = (tmp_path / "shared-objects").as_uri()
    proc = ServeProcess(model_dir, tmp_path / "proc", tmp_path / "proc.log", env={"OMP_NUM_THREADS": "1"},
                        extra_args=("--registry", postgres_url, "--storage", store, *serve_args))
    live = LiveServer.start(server_options(model_dir, tmp_path / "live", storage=store, registry=postgres_url,
                                           **options))
    try:
        proc.start()
        yield live, proc
    finally:
        proc.kill()
        live.stop()
        live.ctx.registry.close()
