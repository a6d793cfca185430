"""FileStore: an account's fine-tuning files (OpenAI Files API's nouns), in the data dir.

Layout: rows in `<data_dir>/training.sqlite` (table `files`), contents in
`<data_dir>/training_files/<id>.jsonl`. A file is visible to its account only: every method takes
the account and answers `NotFound` for another account's id, exactly as for a missing one.

Contract: `create` validates the content (`validate_chat_jsonl`) before anything is written; a
refused file leaves no row and no content. Each call opens its own SQLite connection, so the store
is safe from any thread; a lock serialises writers. Blocking: call it from a worker thread.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loraplex.errors import InvalidInput, NotFound, TooLarge
from loraplex.training.datasets import validate_chat_jsonl

PURPOSE = "fine-tune"
DEFAULT_MAX_FILE_BYTES = 64 * 2**20

_SCHEMA = """CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, account TEXT NOT NULL, purpose TEXT NOT NULL, filename TEXT NOT NULL,
    bytes INTEGER NOT NULL, examples INTEGER NOT NULL, created_at INTEGER NOT NULL)"""


@dataclass(frozen=True)
class FileRecord:
    id: str
    account: str
    purpose: str
    filename: str
    bytes: int
    examples: int
    created_at: int

    def as_openai(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed"}


class FileStore:
    def __init__(self, data_dir: Path, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
        self.db_path = data_dir / "training.sqlite"
        self.content_dir = data_dir / "training_files"
        self.content_dir.mkdir(parents=True, exist_ok=True)
        self.max_file_bytes = max_file_bytes
        self._lock = threading.Lock()
        with self._connect() as conn:
            conn.execute(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.db_path, timeout=30)

    def create(self, account: str, purpose: str, filename: str, data: bytes,
               count_tokens: Callable[[list], int] | None = None,
               max_tokens: int | None = None) -> FileRecord:
        if purpose != PURPOSE:
            raise InvalidInput(f"purpose must be {PURPOSE!r}, not {purpose!r}")
        if len(data) > self.max_file_bytes:
            raise TooLarge(f"the file has {len(data)} bytes; the limit is {self.max_file_bytes}")
        summary = validate_chat_jsonl(data, count_tokens, max_tokens)
        record = FileRecord(f"file-{uuid.uuid4().hex}", account, purpose, filename[:255] or "data.jsonl",
                            len(data), summary.examples, int(time.time()))
        path = self.content_dir / f"{record.id}.jsonl"
        path.write_bytes(data)
        try:
            with self._lock, self._connect() as conn:
                conn.execute("INSERT INTO files VALUES (?,?,?,?,?,?,?)", tuple(record.__dict__.values()))
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return record

    def list(self, account: str) -> list[FileRecord]:
        with self._connect() as conn:
            rows = conn.execute("SELECT * FROM files WHERE account=? ORDER BY created_at DESC, id",
                                (account,)).fetchall()
        return [FileRecord(*r) for r in rows]

    def get(self, account: str, file_id: str) -> FileRecord:
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM files WHERE account=? AND id=?", (account, file_id)).fetchone()
        if row is None:
            raise NotFound(f"no file {file_id!r}")
        return FileRecord(*row)

    def content(self, account: str, file_id: str) -> bytes:
        return (self.content_dir / f"{self.get(account, file_id).id}.jsonl").read_bytes()

    def delete(self, account: str, file_id: str) -> None:
        record = self.get(account, file_id)
        with self._lock, self._connect() as conn:
            conn.execute("DELETE FROM files WHERE id=?", (record.id,))
        (self.content_dir / f"{record.id}.jsonl").unlink(missing_ok=True)
