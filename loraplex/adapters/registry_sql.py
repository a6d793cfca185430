"""The database half of the registry: the two SQL backends (SQLite, PostgreSQL) behind one small
interface, and the per-thread connections both use. The domain rules (tenancy, limits, names,
tokens, states) live in registry.py and are written once against this interface.

Contracts:

- Statements are written once, in the SQL both databases speak, with `?` placeholders; every
  value travels as a parameter. `Connection.execute(sql, params)` returns a cursor with
  `fetchone()`, `fetchall()` and iteration.
- Isolation, per backend, so that the registry's invariants hold across processes:
  - SQLite: writes are `BEGIN IMMEDIATE` (one writer at a time for the whole file, across
    processes); reads are one deferred transaction (one snapshot). `FOR_UPDATE` is empty: the
    write lock already covers every row.
  - PostgreSQL: writes are READ COMMITTED transactions that lock the rows their decision depends on
    with `SELECT … FOR UPDATE` (the account row before counting its finetunes, the finetune row
    before changing its assets or deleting it), so two processes deciding on the same account or
    finetune take turns and the second sees the first's commit. Reads are REPEATABLE READ READ ONLY
    (one snapshot). Unique constraints back the name rule should a path ever skip the lock.
- Schema: both backends run the same MIGRATIONS (registry.py) in one transaction; the version is
  `PRAGMA user_version` (SQLite) or the one row of `registry_schema` (PostgreSQL, migrations
  serialized across processes by a transaction-scoped advisory lock).
- Named locks (`exclusive`), for work that spans more than one transaction (an upload: store the
  object, then record it), held against every thread and process using the database: PostgreSQL
  session advisory locks; for SQLite, Linux open-file-description locks on one byte of the file
  `<registry>-locks` (elsewhere: none, so one process per SQLite file there). Not re-entrant
  (callers never nest one name); released by the database or the kernel if the process dies.
- Failures: `is_unavailable` tells a database that cannot be reached (PostgreSQL down, restarting,
  the connection ended, a row lock not granted within the timeout) from a failed statement.
- Threads: `ThreadConnections` gives each thread its own connection, opened on first use, closed
  when the thread ends or on `close_all()`; a PostgreSQL connection found broken (server restart)
  is replaced on the thread's next call (the call that found it broken fails).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sqlite3
import struct
import threading
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

__all__ = ["Connection", "RegistrySchemaError", "SqlBackend", "SqliteBackend", "PostgresBackend", "ThreadConnections",
           "backend_for", "is_postgres_url"]

# one advisory-lock key for "migrating the registry schema" (any constant unique to loraplex)
_MIGRATION_LOCK = 0x6C6F7261706C6578 & 0x7FFFFFFFFFFFFFFF  # "loraplex"


class Connection(Protocol):
    def execute(self, sql: str, params: tuple = ...) -> Any: ...

    def close(self) -> None: ...


class RegistrySchemaError(RuntimeError):
    """The registry's database cannot be used by this code (its schema version is newer, or its
    journal cannot be switched to WAL)."""


def is_postgres_url(location: object) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


class SqlBackend:
    """What differs between the databases; everything else is in registry.py."""

    BEGIN_WRITE: str
    BEGIN_READ: str
    FOR_UPDATE: str  # appended to a single-table SELECT to lock the rows it returns until commit
    ROW_ORDER: str  # breaks ties of created_at in listings ("oldest first")

    def connect(self) -> Connection:
        raise NotImplementedError

    def usable(self, conn: Connection) -> bool:
        return True

    def in_transaction(self, conn: Connection) -> bool:
        raise NotImplementedError

    def read_version(self, conn: Connection) -> int:
        raise NotImplementedError

    def begin_migration(self, conn: Connection) -> None:
        """Inside the migration's write transaction, before the version is read again."""

    def write_version(self, conn: Connection, version: int) -> None:
        raise NotImplementedError

    def is_unique_violation(self, error: BaseException) -> bool:
        raise NotImplementedError

    def is_unavailable(self, error: BaseException) -> bool:
        """`error` says the database cannot be reached (a retry later may succeed)."""
        return False

    @contextmanager
    def exclusive(self, conn: Connection, name: str) -> Iterator[None]:
        """Hold a lock named `name` against every connection to this database; the base class
        holds nothing (SQLite: callers' in-process locks are the only ones)."""
        yield

    def describe(self) -> str:
        raise NotImplementedError


class SqliteBackend(SqlBackend):
    """One SQLite file: WAL journal, foreign keys on, a busy timeout."""

    BEGIN_WRITE = "BEGIN IMMEDIATE"
    BEGIN_READ = "BEGIN"
    FOR_UPDATE = ""
    ROW_ORDER = "rowid"

    def __init__(self, path: Path, busy_timeout_s: float):
        self.path = Path(path)
        self._busy_timeout_ms = int(busy_timeout_s * 1000)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=self._busy_timeout_ms / 1000)
        conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms:d}")
        conn.execute("PRAGMA foreign_keys = ON")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            conn.close()
            raise RegistrySchemaError(f"{self.path}: cannot switch the journal to WAL (got {mode!r})")
        return conn

    def in_transaction(self, conn: sqlite3.Connection) -> bool:
        return conn.in_transaction

    def read_version(self, conn: sqlite3.Connection) -> int:
        return conn.execute("PRAGMA user_version").fetchone()[0]

    def write_version(self, conn: sqlite3.Connection, version: int) -> None:
        conn.execute(f"PRAGMA user_version = {int(version):d}")

    def is_unique_violation(self, error: BaseException) -> bool:
        return isinstance(error, sqlite3.IntegrityError) and "UNIQUE" in str(error)

    @contextmanager
    def exclusive(self, conn: sqlite3.Connection, name: str) -> Iterator[None]:
        """A write lock on byte sha256(name) mod 2^56 of `<registry>-locks`, taken through a file
        description of its own (F_OFD_SETLKW), so it excludes other threads as well as processes
        and ends when that descriptor is closed."""
        if not hasattr(fcntl, "F_OFD_SETLKW"):  # not Linux: one process per file
            yield
            return
        offset = int.from_bytes(hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()[:7], "big")
        fd = os.open(f"{self.path}-locks", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            # struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks)
            fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, struct.pack("@hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0))
            yield
        finally:
            os.close(fd)

    def describe(self) -> str:
        return str(self.path)


class _PgConnection:
    """A psycopg connection in autocommit mode (transactions are explicit BEGIN … COMMIT) that
    takes the registry's `?` placeholders."""

    def __init__(self, conn):
        self.raw = conn

    def execute(self, sql: str, params: tuple | None = None):
        if params is None:
            return self.raw.execute(sql)
        return self.raw.execute(sql.replace("%", "%%").replace("?", "%s"), params)

    def close(self) -> None:
        self.raw.close()


class PostgresBackend(SqlBackend):
    """A PostgreSQL database (psycopg 3) given by a libpq URL, shared by every process using it."""

    BEGIN_WRITE = "BEGIN ISOLATION LEVEL READ COMMITTED"
    BEGIN_READ = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
    FOR_UPDATE = " FOR UPDATE"
    ROW_ORDER = "id"

    def __init__(self, url: str, timeout_s: float):
        try:
            import psycopg  # only needed for this backend
        except ImportError:
            raise RegistrySchemaError("a postgresql:// registry needs psycopg 3: pip install 'loraplex[scaleout]'") from None

        self._psycopg = psycopg
        self.url = url
        self._connect_timeout_s = max(1, int(timeout_s))
        self._lock_timeout_ms = int(timeout_s * 1000)

    def connect(self) -> _PgConnection:
        conn = self._psycopg.connect(self.url, autocommit=True, connect_timeout=self._connect_timeout_s,
                                     application_name="loraplex-registry")
        try:
            conn.execute(f"SET lock_timeout = {self._lock_timeout_ms:d}")  # like SQLite's busy timeout
        except BaseException:
            conn.close()
            raise
        return _PgConnection(conn)

    def usable(self, conn: _PgConnection) -> bool:
        return not conn.raw.closed and not conn.raw.broken

    def in_transaction(self, conn: _PgConnection) -> bool:
        return conn.raw.info.transaction_status != self._psycopg.pq.TransactionStatus.IDLE

    def read_version(self, conn: _PgConnection) -> int:
        if conn.execute("SELECT to_regclass('registry_schema')").fetchone()[0] is None:
            return 0
        row = conn.execute("SELECT version FROM registry_schema").fetchone()
        return 0 if row is None else row[0]

    def begin_migration(self, conn: _PgConnection) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS registry_schema (version INTEGER NOT NULL)")

    def write_version(self, conn: _PgConnection, version: int) -> None:
        conn.execute("DELETE FROM registry_schema")
        conn.execute("INSERT INTO registry_schema (version) VALUES (?)", (int(version),))

    def is_unique_violation(self, error: BaseException) -> bool:
        return isinstance(error, self._psycopg.errors.UniqueViolation)

    def is_unavailable(self, error: BaseException) -> bool:
        # no connection (refused, lost, server shutting down: sqlstate None, 08xxx, 57P0x), or a row
        # lock not granted within the lock timeout (55P03); not a failed statement
        if not isinstance(error, self._psycopg.OperationalError):
            return False
        state = getattr(error, "sqlstate", None)
        return state is None or state.startswith(("08", "57P")) or state == "55P03"

    @contextmanager
    def exclusive(self, conn: _PgConnection, name: str) -> Iterator[None]:
        """A session advisory lock on hashtextextended(name), waited for without a timeout: held by
        this thread's connection, released on exit (or by the server if the process dies)."""
        conn.execute("SET lock_timeout = 0")
        try:
            conn.execute("SELECT pg_advisory_lock(hashtextextended(?, 0))", (name,))
        finally:
            conn.execute(f"SET lock_timeout = {self._lock_timeout_ms:d}")
        try:
            yield
        finally:
            if self.usable(conn):
                conn.execute("SELECT pg_advisory_unlock(hashtextextended(?, 0))", (name,))

    def describe(self) -> str:
        """The URL without its password (for messages)."""
        info = self._psycopg.conninfo.conninfo_to_dict(self.url)
        host, db = info.get("host") or "localhost", info.get("dbname") or info.get("user") or ""
        return f"postgresql database {db!r} on {host}"


def backend_for(location: Path | str, busy_timeout_s: float) -> SqlBackend:
    """`postgresql://…` / `postgres://…` → PostgresBackend; a path → SqliteBackend. Another URL
    (something with "://") is refused, so a typo never silently creates a local file."""
    if is_postgres_url(location):
        return PostgresBackend(location, busy_timeout_s)
    if isinstance(location, str) and "://" in location:
        raise ValueError(f"registry {location.split('://')[0]}://…: expected a postgresql:// URL or a file path")
    return SqliteBackend(Path(location), busy_timeout_s)


class _ThreadConnection:
    """Holds one thread's connection; closes it when the thread's locals are dropped."""

    def __init__(self, conn: Connection):
        self.conn: Connection | None = conn

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    def __del__(self) -> None:  # the owning thread ended
        try:
            self.close()
        except Exception:
            pass


class ThreadConnections:
    """One connection per thread, made by `connect`. `get()` from any thread; `close_all()` only
    when no call is in flight."""

    def __init__(self, connect: Callable[[], Connection], usable: Callable[[Connection], bool]):
        self._connect = connect
        self._usable = usable
        self._local = threading.local()
        self._holders: weakref.WeakSet[_ThreadConnection] = weakref.WeakSet()
        self._lock = threading.Lock()
        self.closed = False

    def get(self) -> Connection:
        if self.closed:
            raise RuntimeError("the registry is closed")
        holder = getattr(self._local, "holder", None)
        if holder is not None and holder.conn is not None and not self._usable(holder.conn):
            holder.close()
        if holder is None or holder.conn is None:
            holder = _ThreadConnection(self._connect())
            self._local.holder = holder
            with self._lock:
                self._holders.add(holder)
        return holder.conn

    def close_all(self) -> None:
        self.closed = True
        with self._lock:
            holders = list(self._holders)
        for holder in holders:
            holder.close()
