"""Run an app with uvicorn, in the log format asked for, and say where it serves only once the
socket is bound (with the real port, also when asked for port 0)."""

from __future__ import annotations

from collections.abc import Callable

import uvicorn

from loraplex.api.connections import uvicorn_config
from loraplex.config import HttpConfig
from loraplex.logs import configure


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_bound: Callable[[str], None]):
        super().__init__(config)
        self._on_bound = on_bound

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self._on_bound(f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}")


def serve(app, http: HttpConfig, host: str, port: int, log_level: str, log_format: str,
          on_bound: Callable[[str], None]) -> None:
    """Serve `app` with the connection bounds of `http` until interrupted; `on_bound(url)` runs
    once the port is bound. Logging is configured (again: harmless) by uvicorn with loraplex's formats."""
    config = uvicorn_config(app, http, host, port, log_level, log_config=configure(log_format, log_level))
    _Server(config, on_bound).run()
