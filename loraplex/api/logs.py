"""Request logs under /accounts/{a}/ai/logs (Workers AI envelope): settings, list (filters,
paginated), get, feedback and correction, delete, and export to a fine-tuning file.

Another account's entry answers 404, as a missing one; lists and exports hold the caller's own
entries only. Filters (query of the list, body of the export): `finetune` (id or name), `since`
and `until` (ISO 8601, or unix seconds; inclusive), `feedback` (`1`, `-1` or `none`). An export
writes the chat-format JSONL of the matching entries, oldest first (`datasets.chat_example`: the
correction replaces the response; −1 without a correction and raw prompts are left out) as an
OpenAI file of purpose `fine-tune`, validated like an upload; none to export is a 400. Store calls
run in worker threads.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool as to_thread

from loraplex.api.auth import authorized_context
from loraplex.api.context import ApiContext
from loraplex.api.errors import envelope, invalid
from loraplex.api.pagination import page_params, paginated
from loraplex.config import RequestLogConfig
from loraplex.errors import FinetuneNotFound, TooLarge
from loraplex.training.datasets import chat_example
from loraplex.training.logs import LogEntry, LogQuery, LogStore

router = APIRouter()
PREFIX = "/accounts/{account_id}/ai/logs"
EXPORT_BATCH = 500  # entries read from the store at a time while exporting
DEFAULT_EXPORT_NAME = "logs-export.jsonl"
_FEEDBACK = {"1": 1, "-1": -1, "none": 0}
MAX_TIME_S = 253402300799  # 9999-12-31T23:59:59Z


def iso(t: float) -> str:
    """Unix seconds → ISO 8601 UTC to the millisecond (exact for the store's millisecond times)."""
    ms = round(t * 1000)
    moment = datetime.fromtimestamp(ms // 1000, UTC) + timedelta(milliseconds=ms % 1000)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def entry_json(entry: LogEntry) -> dict:
    r = entry.record
    return {"id": entry.id, "created_at": iso(r.created_at), "model": r.model, "finetune": r.finetune,
            "dialect": r.dialect, "messages": r.messages, "prompt": r.prompt, "response": r.response,
            "corrected_response": entry.corrected_response, "feedback": entry.feedback,
            "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "duration_ms": r.duration_ms, "finish_reason": r.finish_reason}


def _time(name: str, value: object) -> float | None:
    if value is None or value == "":
        return None
    text = str(value).strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise invalid(f"{name} must be ISO 8601 or unix seconds, got {text[:40]!r}") from None
        seconds = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    if not 0 <= seconds <= MAX_TIME_S:  # also NaN and infinities
        raise invalid(f"{name} must be a time from 1970 to 9999, got {text[:40]!r}")
    return seconds


def _query(ctx: ApiContext, account_id: str, filters: dict) -> LogQuery:
    """Filters (strings from a query, or JSON values of a body) → LogQuery. Blocking (registry)."""
    finetune = filters.get("finetune")
    finetunes = None
    if finetune is not None:
        if not isinstance(finetune, str) or not finetune:
            raise invalid("finetune must be a finetune id or name")
        finetunes = (finetune,)
        try:
            finetunes += (ctx.registry.get_finetune(account_id, finetune).id,)
        except FinetuneNotFound:  # a deleted finetune's id still finds its entries
            pass
    feedback = filters.get("feedback")
    if feedback is not None:
        if str(feedback) not in _FEEDBACK or isinstance(feedback, bool):
            raise invalid(f"feedback must be 1, -1 or none, got {str(feedback)[:40]!r}")
        feedback = _FEEDBACK[str(feedback)]
    return LogQuery(finetunes, _time("since", filters.get("since")), _time("until", filters.get("until")), feedback)


class _Page:
    """The matching entries as a lazy sequence for `paginated`: counts and reads only one page."""

    def __init__(self, store: LogStore, account: str, query: LogQuery):
        self.store, self.account, self.query = store, account, query

    def __len__(self) -> int:
        return self.store.count(self.account, self.query)

    def __getitem__(self, window: slice) -> list[dict]:
        if window.start >= 2**62:  # past any list (and past what SQLite's OFFSET takes)
            return []
        entries = self.store.list(self.account, self.query, window.start, window.stop - window.start)
        return [entry_json(e) for e in entries]


async def _ctx(request: Request, account_id: str) -> ApiContext:
    ctx: ApiContext = await authorized_context(request, account_id)
    if ctx.request_logs is None:
        raise invalid("this server keeps no request logs")
    return ctx


async def _json_object(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw) if raw.strip() else {}
    except (ValueError, RecursionError):
        raise invalid("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object")
    return body


def _settings_json(settings) -> dict:
    return {"enabled": settings.enabled, "retention_days": settings.retention_days}


@router.get(PREFIX + "/settings")
async def get_settings(account_id: str, request: Request):
    ctx = await _ctx(request, account_id)
    return envelope(_settings_json(await ctx.request_logs.settings(account_id)))


@router.put(PREFIX + "/settings")
async def put_settings(account_id: str, request: Request):
    """Body `{"enabled"?: bool, "retention_days"?: int}`; fields left out keep their value."""
    ctx = await _ctx(request, account_id)
    body = await _json_object(request)
    enabled, days = body.get("enabled"), body.get("retention_days")
    if "enabled" in body and not isinstance(enabled, bool):
        raise invalid(f"enabled must be true or false, got {json.dumps(enabled)[:40]}")
    if "retention_days" in body:
        ctx.request_logs.store.check_retention(days)
    return envelope(_settings_json(await ctx.request_logs.put_settings(account_id, enabled, days)))


@router.get(PREFIX, openapi_extra=page_params(RequestLogConfig.max_per_page))
async def list_logs(account_id: str, request: Request):
    """Newest first; filters `finetune`, `since`, `until`, `feedback` (see the module); at most
    `RequestLogConfig.max_per_page` entries a page."""
    ctx = await _ctx(request, account_id)
    query = await to_thread(_query, ctx, account_id, dict(request.query_params))
    store = ctx.request_logs.store
    return await to_thread(paginated, request, _Page(store, account_id, query), store.config.max_per_page)


@router.post(PREFIX + "/export")
async def export_logs(account_id: str, request: Request):
    """Body: the list's filters and `filename`; the new file as OpenAI describes files."""
    ctx = await _ctx(request, account_id)
    body = await _json_object(request)
    filename = body.get("filename", DEFAULT_EXPORT_NAME)
    if not isinstance(filename, str) or not 0 < len(filename) <= 255:
        raise invalid("filename must be 1 to 255 characters")
    query = await to_thread(_query, ctx, account_id, body)
    data = await to_thread(_export_bytes, ctx, account_id, query)
    count = lambda messages: len(ctx.tokenizer.encode_chat(messages))  # noqa: E731
    record = await to_thread(ctx.files.create, account_id, "fine-tune", filename, data, count, ctx.max_model_len)
    return envelope(record.as_openai())


def _export_bytes(ctx: ApiContext, account_id: str, query: LogQuery) -> bytes:
    """The JSONL of the matching entries, oldest first; TooLarge past the file store's limit,
    InvalidInput when none can be exported. Blocking."""
    lines, size, offset = [], 0, 0
    while batch := ctx.request_logs.store.list(account_id, query, offset, EXPORT_BATCH, oldest_first=True):
        offset += len(batch)
        for e in batch:
            example = chat_example(e.record.messages, e.record.response, e.corrected_response, e.feedback,
                                   e.record.finish_reason)
            if example is not None:
                lines.append(json.dumps(example, ensure_ascii=False).encode() + b"\n")
                size += len(lines[-1])
                if size > ctx.files.max_file_bytes:
                    raise TooLarge(f"the export is over the file limit of {ctx.files.max_file_bytes} bytes; "
                                   "narrow it with finetune, since, until or feedback")
    if not lines:
        raise invalid("no log entries to export: none match, or every match is left out (feedback -1 "
                      "without a correction, a raw prompt, an unfinished generation, an empty response)")
    return b"".join(lines)


@router.get(PREFIX + "/{log_id}")
async def get_log(account_id: str, log_id: str, request: Request):
    ctx = await _ctx(request, account_id)
    return envelope(entry_json(await to_thread(ctx.request_logs.store.get, account_id, log_id)))


@router.patch(PREFIX + "/{log_id}")
async def patch_log(account_id: str, log_id: str, request: Request):
    """Body `{"feedback"?: 1 | -1 | null, "corrected_response"?: str | null}` (null clears)."""
    ctx = await _ctx(request, account_id)
    body = await _json_object(request)
    changes = {k: body[k] for k in ("feedback", "corrected_response") if k in body}
    return envelope(entry_json(await to_thread(ctx.request_logs.store.update, account_id, log_id, changes)))


@router.delete(PREFIX + "/{log_id}")
async def delete_log(account_id: str, log_id: str, request: Request):
    ctx = await _ctx(request, account_id)
    await to_thread(ctx.request_logs.store.delete, account_id, log_id)
    return envelope({"id": log_id})
