"""FileStore: an account's fine-tuning files (OpenAI Files API's nouns), shared by every server of
a deployment.

Layout: rows in the training database (table `training_files`, training/database.py: the
registry's PostgreSQL database, or `training.sqlite`), contents in the server's object store
(`ApiContext.store`, `file://` or S3) under the key `training-files/<file id>/sha256/<hex>`: one
object per file, never shared, verified against its hash on every read. Any server using the same
database and store lists, reads and trains on a file uploaded through another.

A file is visible to its account only: every method takes the account and answers `NotFound` for
another account's id, exactly as for a missing one.

Consistency (no half-written file, no orphan object):
- `create` validates the content (`validate_chat_jsonl`) before anything is written; a refused
  file leaves no row and no object. Then the object is stored, then the row inserted; if the
  insert fails the object is deleted again. A row therefore always has its object.
- `delete` deletes the row (one transaction), then the object; a failure to delete the object
  after the row went is logged (the object is unreachable, never served) and not raised.
Thread-safe (one database connection per thread). Blocking: call it from a worker thread.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from loraplex.adapters.registry_sql import SqlDatabase
from loraplex.adapters.storage import ObjectStore
from loraplex.errors import InvalidInput, NotFound, TooLarge
from loraplex.training.datasets import validate_chat_jsonl

log = logging.getLogger(__name__)

PURPOSE = "fine-tune"
DEFAULT_MAX_FILE_BYTES = 64 * 2**20
KEY_SCOPE = "training-files"  # object keys: training-files/<file id>/sha256/<hex>

_COLUMNS = "id, account, purpose, filename, bytes, examples, created_at"


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
    def __init__(self, db: SqlDatabase, store: ObjectStore, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
        self.db, self.store, self.max_file_bytes = db, store, max_file_bytes

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
        key = self.store.put_bytes(data, scope=f"{KEY_SCOPE}/{record.id}").key
        try:
            with self.db.write() as conn:
                conn.execute(f"INSERT INTO training_files ({_COLUMNS}, object_key) VALUES (?,?,?,?,?,?,?,?)",
                             (*record.__dict__.values(), key))
        except BaseException:
            self._delete_object(key)
            raise
        return record

    def list(self, account: str) -> list[FileRecord]:
        with self.db.read() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM training_files WHERE account=? ORDER BY created_at DESC, id",
                                (account,)).fetchall()
        return [FileRecord(*r) for r in rows]

    def _row(self, account: str, file_id: str) -> tuple:
        with self.db.read() as conn:
            row = conn.execute(f"SELECT {_COLUMNS}, object_key FROM training_files WHERE account=? AND id=?",
                               (account, file_id)).fetchone()
        if row is None:
            raise NotFound(f"no file {str(file_id)[:100]!r}")
        return tuple(row)

    def get(self, account: str, file_id: str) -> FileRecord:
        return FileRecord(*self._row(account, file_id)[:-1])

    def content(self, account: str, file_id: str) -> bytes:
        """The file's bytes, from the object store (verified against their hash)."""
        return self.store.get_bytes(self._row(account, file_id)[-1])

    def delete(self, account: str, file_id: str) -> None:
        with self.db.write() as conn:
            row = conn.execute("SELECT object_key FROM training_files WHERE account=? AND id=?"
                               + self.db.backend.FOR_UPDATE, (account, file_id)).fetchone()
            if row is None:
                raise NotFound(f"no file {str(file_id)[:100]!r}")
            conn.execute("DELETE FROM training_files WHERE id=?", (file_id,))
        self._delete_object(row[0])

    def _delete_object(self, key: str) -> None:
        try:
            self.store.delete(key)
        except Exception as e:  # the row is gone (or never was): the object is unreachable
            log.warning("training file object %s not deleted: %s", key, type(e).__name__)
