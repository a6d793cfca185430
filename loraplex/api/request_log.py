"""Recording generations into the request logs, from the request path, without slowing it.

Each generation route calls `await capture(...)` once its body is parsed and before it starts
generating: it decides whether this request is logged (the `cf-aig-collect-log: true|false`
header, else the account's setting, read from a per-process cache after its first read) and puts
the decision in the context variable `LOG_CAPTURE` (None: not logged). A `Generation` picks it up
when it starts and, when it ends, calls `LogCapture.record(...)`, which only builds a `LogRecord`
and hands it to the `LogWriter`'s bounded queue: no I/O, never blocks, never raises. A header
other than true/false is a 400 before any generation starts.

Settings cache: one API process per data dir writes an account's settings (PUT goes through
`RequestLogs.put_settings`, which updates the cache), so the cache never goes stale.
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from dataclasses import dataclass

from fastapi import Request
from starlette.concurrency import run_in_threadpool as to_thread

from loraplex.api.errors import invalid
from loraplex.training.log_writer import LogWriter
from loraplex.training.logs import LogRecord, LogSettings, LogStore

log = logging.getLogger(__name__)
HEADER = "cf-aig-collect-log"


@dataclass(frozen=True)
class LogCapture:
    """What a logged request's generations need to make their records."""

    writer: LogWriter
    account: str
    created_at: float
    model: str
    dialect: str
    messages: list[dict]
    prompt: str | None

    def record(self, finetune: str | None, response: str, prompt_tokens: int, completion_tokens: int,
               duration_s: float, finish_reason: str | None) -> None:
        """Hand one generation's record to the writer. Never raises (a bug here is logged)."""
        try:
            self.writer.submit(LogRecord(self.account, self.created_at, self.model, finetune, self.dialect,
                                         self.messages, self.prompt, response, prompt_tokens, completion_tokens,
                                         round(duration_s * 1000), finish_reason))
        except Exception:
            log.exception("request log record failed")


LOG_CAPTURE: ContextVar[LogCapture | None] = ContextVar("loraplex_log_capture", default=None)


class RequestLogs:
    """The server's request logs: the store, its background writer and the settings cache."""

    def __init__(self, store: LogStore, writer: LogWriter):
        self.store, self.writer = store, writer
        self._settings: dict[str, LogSettings] = {}

    async def settings(self, account: str) -> LogSettings:
        cached = self._settings.get(account)
        if cached is None:
            cached = self._settings[account] = await to_thread(self.store.settings, account)
        return cached

    async def put_settings(self, account: str, enabled: bool | None, retention_days: int | None) -> LogSettings:
        new = await to_thread(self.store.put_settings, account, enabled, retention_days)
        self._settings[account] = new
        return new


def _header_choice(request: Request) -> bool | None:
    value = request.headers.get(HEADER)
    if value is None:
        return None
    if value.strip().lower() not in ("true", "false"):
        raise invalid(f"the {HEADER} header must be true or false, got {value[:40]!r}")
    return value.strip().lower() == "true"


async def capture(request: Request, account: str, dialect: str, model: str, *,
                  messages: list[dict] | None = None, prompt: str | None = None) -> None:
    """Decide whether this request is logged and set LOG_CAPTURE for its generations.
    `messages` for a conversation, else `prompt` (a raw prompt; a plain one is passed as one
    user turn in `messages`)."""
    LOG_CAPTURE.set(None)
    logs: RequestLogs | None = request.app.state.ctx.request_logs
    wanted = _header_choice(request)
    if logs is None:
        return
    if wanted is None:
        wanted = (await logs.settings(account)).enabled
    if wanted:
        LOG_CAPTURE.set(LogCapture(logs.writer, account, time.time(), model, dialect, messages or [], prompt))
