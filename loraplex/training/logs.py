"""Request logs: each account's recorded generations, its logging settings, and their bounds.

`LogStore` is the interface (SQLite here, `SqliteLogStore`; a PostgreSQL store implements the
same methods). Contracts every implementation keeps:
- Every method taking an account answers `NotFound` for another account's entry, exactly as for
  a missing one; lists and counts hold the account's own entries only.
- `add` keeps the bounds of `RequestLogConfig`: an entry whose text is over `max_entry_bytes` is
  refused (`TooLarge`, nothing stored: the new one is skipped); past `max_entries_per_account`
  the account's oldest entries are deleted (the new one is kept); the account's expired entries
  are deleted too.
- Retention: an entry older than its account's `retention_days` (measured by `clock`, which
  tests may replace) is never listed, fetched or exported, and is deleted by the next `add` of
  the account or the next `sweep()`.
Blocking (SQLite): call from worker threads. Each call opens its own connection; a lock
serialises writers, so the store is safe from any thread.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.config import RequestLogConfig
from loraplex.errors import InvalidInput, NotFound, TooLarge

DIALECTS = ("workers-ai", "openai-chat", "openai-completions")
DAY_S = 86400.0


@dataclass(frozen=True)
class LogSettings:
    enabled: bool
    retention_days: int


@dataclass(frozen=True)
class LogRecord:
    """One finished generation, as the request path hands it over (not yet stored).
    `messages`: the conversation ([] for a raw prompt, which is in `prompt` instead)."""

    account: str
    created_at: float  # unix seconds
    model: str
    finetune: str | None  # finetune id
    dialect: str
    messages: list[dict]
    prompt: str | None
    response: str
    prompt_tokens: int
    completion_tokens: int
    duration_ms: int
    finish_reason: str | None


@dataclass(frozen=True)
class LogEntry:
    """A stored record, with its id and the tenant's curation (feedback, corrected response)."""

    id: str
    record: LogRecord
    feedback: int | None = None  # 1, -1 or None
    corrected_response: str | None = None


@dataclass(frozen=True)
class LogQuery:
    """Filters of list / count / export. `finetunes`: entries of any of these finetune ids
    (None: every finetune and the base model); `feedback`: 1, -1, or 0 for "none given"."""

    finetunes: tuple[str, ...] | None = None
    since: float | None = None
    until: float | None = None
    feedback: int | None = None


def _ms(t: float) -> int:
    """Unix seconds → whole milliseconds: how times are stored and compared (`since` / `until`
    given to the millisecond, as entries show them, match exactly)."""
    return round(t * 1000)


def entry_bytes(record: LogRecord, corrected_response: str | None = None) -> int:
    """The size an entry counts against `max_entry_bytes`: its texts, UTF-8."""
    texts = [json.dumps(record.messages, ensure_ascii=False), record.prompt or "", record.response,
             corrected_response or ""]
    return sum(len(t.encode()) for t in texts)


class LogStore(ABC):
    config: RequestLogConfig
    clock: Callable[[], float]

    @abstractmethod
    def settings(self, account: str) -> LogSettings: ...

    @abstractmethod
    def put_settings(self, account: str, enabled: bool | None = None,
                     retention_days: int | None = None) -> LogSettings:
        """Change the given fields (None: keep); InvalidInput for retention outside the bounds."""

    @abstractmethod
    def add(self, record: LogRecord) -> LogEntry: ...

    @abstractmethod
    def list(self, account: str, query: LogQuery, offset: int = 0, limit: int | None = None,
             oldest_first: bool = False) -> list[LogEntry]:
        """Newest first (by time, then insertion), unless `oldest_first`."""

    @abstractmethod
    def count(self, account: str, query: LogQuery) -> int: ...

    @abstractmethod
    def get(self, account: str, log_id: str) -> LogEntry: ...

    @abstractmethod
    def update(self, account: str, log_id: str, changes: dict) -> LogEntry:
        """`changes` holds `feedback` and/or `corrected_response` (None clears)."""

    @abstractmethod
    def delete(self, account: str, log_id: str) -> None: ...

    @abstractmethod
    def sweep(self) -> int:
        """Delete every account's expired entries; how many went."""

    def check_retention(self, days: object) -> int:
        low, high = self.config.min_retention_days, self.config.max_retention_days
        if isinstance(days, bool) or not isinstance(days, int) or not low <= days <= high:
            raise InvalidInput(f"retention_days must be an integer from {low} to {high}, got {str(days)[:40]!r}")
        return days


_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS request_logs (
        id TEXT PRIMARY KEY, account TEXT NOT NULL, created_ms INTEGER NOT NULL, model TEXT NOT NULL,
        finetune TEXT, dialect TEXT NOT NULL, messages TEXT NOT NULL, prompt TEXT, response TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, duration_ms INTEGER NOT NULL,
        finish_reason TEXT, feedback INTEGER, corrected_response TEXT)""",
    "CREATE INDEX IF NOT EXISTS request_logs_by_account ON request_logs (account, created_ms)",
    """CREATE TABLE IF NOT EXISTS log_settings (
        account TEXT PRIMARY KEY, enabled INTEGER NOT NULL, retention_days INTEGER NOT NULL)""",
)
_COLUMNS = ("id, account, created_ms, model, finetune, dialect, messages, prompt, response, prompt_tokens, "
            "completion_tokens, duration_ms, finish_reason, feedback, corrected_response")


def _entry(row) -> LogEntry:
    (log_id, account, created_at, model, finetune, dialect, messages, prompt, response, prompt_tokens,
     completion_tokens, duration_ms, finish_reason, feedback, corrected) = row
    record = LogRecord(account, created_at / 1000, model, finetune, dialect, json.loads(messages), prompt, response,
                       prompt_tokens, completion_tokens, duration_ms, finish_reason)
    return LogEntry(log_id, record, feedback, corrected)


@dataclass
class SqliteLogStore(LogStore):
    """Tables `request_logs` and `log_settings` in `<data_dir>/training.sqlite` (beside files and jobs)."""

    data_dir: Path
    config: RequestLogConfig = field(default_factory=RequestLogConfig)
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.data_dir / "training.sqlite"
        self._lock = threading.Lock()
        with self._connect() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.db_path, timeout=30)

    def settings(self, account: str) -> LogSettings:
        with self._connect() as conn:
            row = conn.execute("SELECT enabled, retention_days FROM log_settings WHERE account=?",
                               (account,)).fetchone()
        if row is None:
            return LogSettings(self.config.default_enabled, self.config.default_retention_days)
        return LogSettings(bool(row[0]), row[1])

    def put_settings(self, account: str, enabled: bool | None = None,
                     retention_days: int | None = None) -> LogSettings:
        if enabled is not None and not isinstance(enabled, bool):
            raise InvalidInput(f"enabled must be true or false, got {str(enabled)[:40]!r}")
        if retention_days is not None:
            self.check_retention(retention_days)
        with self._lock:
            current = self.settings(account)
            new = LogSettings(current.enabled if enabled is None else enabled,
                              current.retention_days if retention_days is None else retention_days)
            with self._connect() as conn:
                conn.execute("INSERT OR REPLACE INTO log_settings VALUES (?,?,?)",
                             (account, int(new.enabled), new.retention_days))
        return new

    def _cutoff(self, account: str) -> int:
        """The oldest time (unix milliseconds) the account's retention keeps."""
        return _ms(self.clock() - self.settings(account).retention_days * DAY_S)

    def add(self, record: LogRecord) -> LogEntry:
        size = entry_bytes(record)
        if size > self.config.max_entry_bytes:
            raise TooLarge(f"the entry has {size} bytes of text; the limit is {self.config.max_entry_bytes}")
        entry = LogEntry(uuid.uuid4().hex, record)
        r = record
        cutoff = self._cutoff(r.account)
        with self._lock, self._connect() as conn:
            conn.execute(f"INSERT INTO request_logs ({_COLUMNS}) VALUES ({','.join('?' * 15)})",
                         (entry.id, r.account, _ms(r.created_at), r.model, r.finetune, r.dialect,
                          json.dumps(r.messages, ensure_ascii=False), r.prompt, r.response, r.prompt_tokens,
                          r.completion_tokens, r.duration_ms, r.finish_reason, None, None))
            conn.execute("DELETE FROM request_logs WHERE account=? AND created_ms < ?", (r.account, cutoff))
            over = conn.execute("SELECT COUNT(*) FROM request_logs WHERE account=?",
                                (r.account,)).fetchone()[0] - self.config.max_entries_per_account
            if over > 0:
                conn.execute("""DELETE FROM request_logs WHERE rowid IN (SELECT rowid FROM request_logs
                                WHERE account=? ORDER BY created_ms, rowid LIMIT ?)""", (r.account, over))
        return entry

    def _where(self, account: str, query: LogQuery) -> tuple[str, list]:
        clauses, params = ["account=?", "created_ms >= ?"], [account, self._cutoff(account)]
        if query.finetunes is not None:
            clauses.append(f"finetune IN ({','.join('?' * len(query.finetunes))})")
            params += query.finetunes
        if query.since is not None:
            clauses.append("created_ms >= ?")
            params.append(_ms(query.since))
        if query.until is not None:
            clauses.append("created_ms <= ?")
            params.append(_ms(query.until))
        if query.feedback is not None:
            clauses.append("feedback IS NULL" if query.feedback == 0 else "feedback = ?")
            params += [] if query.feedback == 0 else [query.feedback]
        return " AND ".join(clauses), params

    def list(self, account: str, query: LogQuery, offset: int = 0, limit: int | None = None,
             oldest_first: bool = False) -> list[LogEntry]:
        where, params = self._where(account, query)
        order = "ASC" if oldest_first else "DESC"
        with self._connect() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM request_logs WHERE {where} "
                                f"ORDER BY created_ms {order}, rowid {order} LIMIT ? OFFSET ?",
                                (*params, -1 if limit is None else limit, offset)).fetchall()
        return [_entry(r) for r in rows]

    def count(self, account: str, query: LogQuery) -> int:
        where, params = self._where(account, query)
        with self._connect() as conn:
            return conn.execute(f"SELECT COUNT(*) FROM request_logs WHERE {where}", params).fetchone()[0]

    def get(self, account: str, log_id: str) -> LogEntry:
        with self._connect() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM request_logs WHERE account=? AND id=? AND created_ms >= ?",
                               (account, log_id, self._cutoff(account))).fetchone()
        if row is None:
            raise NotFound(f"no log entry {log_id[:100]!r}")
        return _entry(row)

    def update(self, account: str, log_id: str, changes: dict) -> LogEntry:
        entry = self.get(account, log_id)
        feedback = changes.get("feedback", entry.feedback)
        corrected = changes.get("corrected_response", entry.corrected_response)
        if feedback is not None and (type(feedback) is not int or feedback not in (1, -1)):
            raise InvalidInput(f"feedback must be 1, -1 or null, got {str(feedback)[:40]!r}")
        if corrected is not None and not (isinstance(corrected, str) and corrected.strip()):
            raise InvalidInput("corrected_response must be a non-empty string, or null to clear it")
        size = entry_bytes(entry.record, corrected)
        if size > self.config.max_entry_bytes:
            raise TooLarge(f"with this correction the entry has {size} bytes of text; "
                           f"the limit is {self.config.max_entry_bytes}")
        with self._lock, self._connect() as conn:
            conn.execute("UPDATE request_logs SET feedback=?, corrected_response=? WHERE id=?",
                         (feedback, corrected, entry.id))
        return self.get(account, log_id)

    def delete(self, account: str, log_id: str) -> None:
        entry = self.get(account, log_id)
        with self._lock, self._connect() as conn:
            conn.execute("DELETE FROM request_logs WHERE id=?", (entry.id,))

    def sweep(self) -> int:
        now, default = self.clock(), self.config.default_retention_days
        with self._lock, self._connect() as conn:
            return conn.execute(
                """DELETE FROM request_logs WHERE created_ms < ? - ? * COALESCE(
                     (SELECT retention_days FROM log_settings s WHERE s.account = request_logs.account), ?)""",
                (_ms(now), _ms(DAY_S), default)).rowcount
