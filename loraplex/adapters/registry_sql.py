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
- Schema: a database holds one or more named schemas (`registry`, `training`), each with its own
  list of migrations, run by `SqlDatabase` in one transaction; the same statements on both
  backends, except the token `$SERIAL_KEY` (an auto-numbered integer primary key, whose DDL
  differs). The version is `PRAGMA user_version` (SQLite: one schema per file) or the one row of
  `<schema>_schema` (PostgreSQL: schemas share a database; migrations serialized across processes
  by a transaction-scoped advisory lock).
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
import logging
import os
import re
import sqlite3
import struct
import threading
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

__all__ = ["Connection", "RegistrySchemaError", "SqlBackend", "SqlDatabase", "SqliteBackend", "PostgresBackend",
           "ThreadConnections", "backend_for", "is_postgres_url"]

log = logging.getLogger(__name__)
_SCHEMA_NAME = re.compile(r"[a-z][a-z0-9_]{0,30}")

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
    # appended to a single-table SELECT … LIMIT n: lock the first n rows no other transaction has
    # locked, skipping those (a queue's claim: concurrent claimers take different rows)
    SKIP_LOCKED: str
    ROW_ORDER: str  # breaks ties of created_at in listings ("oldest first")
    SERIAL_KEY: str  # DDL of an auto-numbered integer primary key (`$SERIAL_KEY` in migrations)
    schema: str = "registry"  # which schema's version read_version / write_version keep

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
    SKIP_LOCKED = ""  # the write transaction holds the whole file: claims already take turns
    ROW_ORDER = "rowid"
    SERIAL_KEY = "INTEGER PRIMARY KEY AUTOINCREMENT"

    def __init__(self, path: Path, busy_timeout_s: float, schema: str = "registry"):
        self.path = Path(path)
        self.schema = schema
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
    SKIP_LOCKED = " FOR UPDATE SKIP LOCKED"
    ROW_ORDER = "id"
    SERIAL_KEY = "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"

    def __init__(self, url: str, timeout_s: float, schema: str = "registry"):
        try:
            import psycopg  # only needed for this backend
        except ImportError:
            raise RegistrySchemaError("a postgresql:// registry needs psycopg 3: pip install 'loraplex[scaleout]'") from None

        self._psycopg = psycopg
        self.url = url
        self.schema = schema
        self._version_table = f"{schema}_schema"
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

    # the version table's name is `<schema>_schema`, the schema name checked by SqlDatabase
    def read_version(self, conn: _PgConnection) -> int:
        if conn.execute("SELECT to_regclass(?)", (self._version_table,)).fetchone()[0] is None:
            return 0
        row = conn.execute(f"SELECT version FROM {self._version_table}").fetchone()
        return 0 if row is None else row[0]

    def begin_migration(self, conn: _PgConnection) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
        conn.execute(f"CREATE TABLE IF NOT EXISTS {self._version_table} (version INTEGER NOT NULL)")

    def write_version(self, conn: _PgConnection, version: int) -> None:
        conn.execute(f"DELETE FROM {self._version_table}")
        conn.execute(f"INSERT INTO {self._version_table} (version) VALUES (?)", (int(version),))

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


def backend_for(location: Path | str, busy_timeout_s: float, schema: str = "registry") -> SqlBackend:
    """`postgresql://…` / `postgres://…` → PostgresBackend; a path → SqliteBackend. Another URL
    (something with "://") is refused, so a typo never silently creates a local file."""
    if is_postgres_url(location):
        return PostgresBackend(location, busy_timeout_s, schema)
    if isinstance(location, str) and "://" in location:
        raise ValueError(f"registry {location.split('://')[0]}://…: expected a postgresql:// URL or a file path")
    return SqliteBackend(Path(location), busy_timeout_s, schema)


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
            raise RuntimeError("the database is closed")
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


class SqlDatabase:
    """One database (a SQLite file or a PostgreSQL URL) as the stores use it: one connection per
    thread, write and read transactions with the isolation stated in the module docstring, one
    named schema migrated on open, named locks, and a database that cannot be reached reported as
    `errors.Unavailable` (saying nothing of the database; the details go to the log).

    `migrations[i]` takes schema `schema` from version i to i + 1; all pending ones run in order
    inside one write transaction when the database is opened. A schema newer than `migrations`
    raises RegistrySchemaError and is left untouched. Thread-safe; `close()` only when no call is
    in flight. `what` names the store in the Unavailable message ("the registry")."""

    def __init__(self, location: Path | str, migrations: list[list[str]], *, schema: str = "registry",
                 busy_timeout_s: float = 10.0, what: str = "the registry"):
        if not _SCHEMA_NAME.fullmatch(schema):
            raise ValueError(f"schema name {schema!r}: expected lowercase letters, digits, _")
        self.backend: SqlBackend = backend_for(location, busy_timeout_s, schema)
        self.location, self.schema, self.what = location, schema, what
        self.migrations = migrations
        self._connections = ThreadConnections(self.backend.connect, self.backend.usable)
        try:
            self._migrate()
        except BaseException:
            self.close()
            raise

    @property
    def kind(self) -> str:
        """"sqlite" or "postgresql"."""
        return "postgresql" if isinstance(self.backend, PostgresBackend) else "sqlite"

    def conn(self) -> Connection:
        """This thread's connection (outside any transaction: one statement, autocommitted)."""
        try:
            return self._connections.get()
        except Exception as e:
            if self.backend.is_unavailable(e):
                raise self.unavailable(e) from e
            raise

    def unavailable(self, error: Exception):
        from loraplex import errors

        log.warning("%s %s unavailable: %s", self.schema, self.backend.describe(),
                    " ".join(str(error).split())[:500] or type(error).__name__)
        return errors.Unavailable(f"{self.what} is unavailable; retry later")

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One write transaction: committed when the block ends, rolled back on any error."""
        with self._transaction(self.backend.BEGIN_WRITE) as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """One read transaction: all statements inside see the same snapshot."""
        with self._transaction(self.backend.BEGIN_READ) as conn:
            yield conn

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[Connection]:
        conn = self.conn()
        try:
            conn.execute(begin)
            yield conn
            conn.execute("COMMIT")
        except BaseException as e:
            # the database may already have rolled back (SQLite on disk full) or be gone (PostgreSQL)
            if self.backend.usable(conn) and self.backend.in_transaction(conn):
                conn.execute("ROLLBACK")
            if isinstance(e, Exception) and self.backend.is_unavailable(e):
                raise self.unavailable(e) from e
            raise

    def _migrate(self) -> None:
        if self._checked_version(self.conn()) == len(self.migrations):
            return
        with self.write() as conn:
            self.backend.begin_migration(conn)
            version = self._checked_version(conn)  # another process may have won
            for index in range(version, len(self.migrations)):
                for statement in self.migrations[index]:
                    conn.execute(statement.replace("$SERIAL_KEY", self.backend.SERIAL_KEY))
                self.backend.write_version(conn, index + 1)

    def _checked_version(self, conn: Connection) -> int:
        version = self.backend.read_version(conn)
        if version > len(self.migrations):
            raise RegistrySchemaError(
                f"{self.backend.describe()}: {self.schema} schema version {version} is newer than this loraplex "
                f"supports ({len(self.migrations)}); upgrade loraplex or use another {self.schema} database")
        return version

    @property
    def schema_version(self) -> int:
        return self.backend.read_version(self.conn())

    @contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        """Hold the lock `name` against every other thread and process using this database (see
        the module docstring); not re-entrant. errors.Unavailable when it cannot be reached."""
        try:
            with self.backend.exclusive(self.conn(), name):
                yield
        except Exception as e:
            if self.backend.is_unavailable(e):
                raise self.unavailable(e) from e
            raise

    def close(self) -> None:
        """Close every thread's connection. Call only when no call is in flight."""
        self._connections.close_all()
