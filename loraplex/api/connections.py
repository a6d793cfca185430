"""Connection-level bounds of the HTTP server: uvicorn's h11 protocol with a connection cap and
header / body read timeouts, and a quiet log for failed accepts.

Why a protocol subclass: uvicorn has no header or body read timeout at all (its keep-alive timer
only runs between requests), and its `limit_concurrency` acts only once a request's headers were
parsed, so connections that never finish their headers are neither counted nor refused. Here:

- Cap (`HttpConfig.max_connections`): a connection made while that many are open is answered
  `503` (Workers AI envelope, code 3040) and closed before anything is read from it.
- Header timeout: from a connection's first moment (or, on a keep-alive connection, from the
  first byte of its next request) to the end of the request's headers. Past it: `408`, closed.
- Body timeout: the longest pause between two pieces of a request body, while the server is
  reading it (not while it holds back because the handler has not consumed what came). Past it
  the connection is closed; the handler sees the client leave (ClientDisconnect, answered
  quietly).
- Accept failures (EMFILE and the like, when the process is out of file descriptors): asyncio
  logs one traceback per failed accept; `quiet_accept_errors` turns them into one warning per
  ACCEPT_LOG_INTERVAL_S with a count. The cap is clamped below the process's descriptor limit
  (`effective_max_connections`), so with the defaults this should not happen at all.

Header size is bounded by h11 (16 KiB of incomplete event), body size by BodyLimitMiddleware.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from loraplex.api.errors import envelope
from loraplex.config import HttpConfig

log = logging.getLogger(__name__)

FD_RESERVE = 64  # descriptors kept for everything but client connections (files, sqlite, pipes)
ACCEPT_LOG_INTERVAL_S = 10.0


def _raw_response(status: int, reason: str, code: int, message: str) -> bytes:
    body = json.dumps(envelope(None, [{"code": code, "message": message}])).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n")
    return head.encode() + body


OVER_CAPACITY = _raw_response(503, "Service Unavailable", 3040, "too many open connections; retry later")
HEADER_TIMEOUT = _raw_response(408, "Request Timeout", 5004, "the request headers took too long to arrive")


def guarded_protocol(config: HttpConfig, max_connections: int) -> type[H11Protocol]:
    """An H11Protocol class enforcing `max_connections` and `config`'s read timeouts."""

    class GuardedH11Protocol(H11Protocol):
        _refused = False
        _timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            if len(self.connections) >= max_connections:
                self._refused = True
                self.transport = transport
                transport.write(OVER_CAPACITY)
                transport.close()
                return
            super().connection_made(transport)
            self._arm(config.header_timeout_s, self._headers_too_slow)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self.conn.their_state is h11.IDLE and self._timer is None:
                self._arm(config.header_timeout_s, self._headers_too_slow)  # a keep-alive request begins
            super().data_received(data)
            self._follow_state()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # may parse a pipelined request
            self._follow_state()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _follow_state(self) -> None:
            state = self.conn.their_state
            if state is h11.SEND_BODY:
                self._arm(config.body_timeout_s, self._body_too_slow)  # restarted by every piece
            elif state is not h11.IDLE or self.transport.is_closing():
                self._disarm()
            elif self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # headers and body in, the handler runs: no read deadline
            # IDLE after a response: uvicorn's keep-alive timer runs until the next byte

        def _arm(self, delay: float, callback) -> None:
            self._disarm()
            self._timer = self.loop.call_later(delay, callback)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _headers_too_slow(self) -> None:
            self._timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.conn.our_state is h11.IDLE:
                self.transport.write(HEADER_TIMEOUT)
            self.transport.close()

        def _body_too_slow(self) -> None:
            self._timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
                return
            if self.flow.read_paused:  # we hold the client back, not the other way round
                self._arm(config.body_timeout_s, self._body_too_slow)
                return
            self.transport.close()  # the handler's receive() sees the disconnect

    return GuardedH11Protocol


def effective_max_connections(config: HttpConfig) -> int:
    """The cap, lowered to fit the process's open-file limit (less FD_RESERVE) if need be."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return config.max_connections
    fitting = max(1, soft - FD_RESERVE)
    if fitting < config.max_connections:
        log.warning("max_connections %d lowered to %d: the open-file limit is %d", config.max_connections, fitting,
                    soft)
    return min(config.max_connections, fitting)


def raise_open_file_limit() -> None:
    """Raise the soft open-file limit to the hard one (a server needs one per connection)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def uvicorn_config(app, config: HttpConfig, host: str, port: int, log_level: str = "info", **extra) -> uvicorn.Config:
    """uvicorn settings of a loraplex server: the guarded h11 protocol, the keep-alive timeout
    (`extra`: more uvicorn.Config arguments, e.g. log_config)."""
    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          http=guarded_protocol(config, effective_max_connections(config)),
                          timeout_keep_alive=config.keep_alive_timeout_s, **extra)


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Install, on `loop`, an exception handler that logs failed accepts (out of descriptors)
    as one warning per ACCEPT_LOG_INTERVAL_S, with the number of failures; everything else goes
    to the handler that was there."""
    previous = loop.get_exception_handler()
    state = {"count": 0, "logged_at": float("-inf")}

    def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if not str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        state["count"] += 1
        now = time.monotonic()
        if now - state["logged_at"] >= ACCEPT_LOG_INTERVAL_S:
            log.warning("accepting connections failed %d time(s) (%r): out of file descriptors?", state["count"],
                        context.get("exception"))
            state["count"], state["logged_at"] = 0, now

    loop.set_exception_handler(handler)
