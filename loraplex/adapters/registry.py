"""The registry of accounts, API tokens, finetunes and their assets: the domain rules, written
once over two databases (registry_sql.py): SQLite (the embedded default, one file in the data dir)
and PostgreSQL (shared by every server of a scale-out deployment).

Contracts:

- Storage: `open_registry` picks the database: a `postgresql://` URL → PostgreSQL (psycopg 3),
  else the SQLite file `registry.sqlite` in the data dir (WAL journal, foreign keys on, a busy
  timeout of `busy_timeout_s`; PostgreSQL gets it as connect and lock timeout). The schema is
  versioned; `MIGRATIONS[i]` takes a database from version i to i + 1 (the same statements on both
  databases), all pending ones applied in order inside one write transaction when the registry is
  opened. A database newer than this code raises `RegistrySchemaError` and is left untouched.
- Atomicity: every write is one transaction and a failure or crash between statements leaves the
  previous committed state. In particular an asset row and the "pending" → "ready" switch commit
  together: a half-uploaded finetune is never usable. Multi-statement reads run inside one read
  transaction, so they see one consistent snapshot.
- Across processes (several API servers on one database): a write locks, inside the database, what
  its decision depends on before deciding (the account row before counting its finetunes and
  checking the name; the finetune row before changing its assets or deleting it; SQLite's write
  transaction locks the whole file), so the per-account limit, name uniqueness and the
  pending → ready switch hold under concurrent writers in any number of processes. No rule relies
  on an in-process lock.
- Threads: one connection per thread, opened on the thread's first call and closed when the
  thread ends or on `close()`. Any method may be called from any thread; call `close()` only when
  no call is in flight.
- Tenancy: an account sees its own finetunes (by id or name) and other accounts' *public* ones by
  id only. Another account's private finetune is reported as not found (FinetuneNotFound), never as
  forbidden, so its existence is not revealed. A name only other accounts' *public* finetunes
  carry is a FinetuneNotFound that says to use the id (public finetunes are listed to everyone anyway).
  Public finetunes are read-only to non-owners (Forbidden).
- Limit: every finetune counts against `max_finetunes_per_account`, whatever its state (pending
  and invalid ones hold rows and objects too); the refusal says how many are not ready.
- Secrets: the raw token is returned once by `create_account` / `create_token`; only its SHA-256
  is stored.
- Names, ids and every other value reach SQL as parameters, never formatted into the SQL text.

The registry stores metadata only: `Asset.object_key` says where the bytes live in object storage,
and the callers upload objects before `add_asset` and delete them after `delete_finetune`.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import uuid
from pathlib import Path

from loraplex import errors
from loraplex.adapters.registry_rules import (MAX_TOKEN_CHARS, REQUIRED_FILES, SHA256_RE, Asset, Finetune, check_name,
                                             check_text, hash_token, invalid, not_found, printable, storable,
                                             utc_now)
from loraplex.adapters.registry_sql import (Connection, RegistrySchemaError, SqlBackend, SqlDatabase,
                                            is_postgres_url)
from loraplex.config import DEFAULT_MAX_FINETUNES_PER_ACCOUNT

__all__ = ["Asset", "Finetune", "Registry", "RegistrySchemaError", "MIGRATIONS", "open_registry"]

log = logging.getLogger(__name__)

# --- schema ---------------------------------------------------------------------------------
# Each migration is a list of single statements (executescript would commit the open transaction),
# in SQL that SQLite and PostgreSQL both run as written (booleans are INTEGER 0/1 on both).
# v1: accounts, tokens, finetunes, assets; a finetune's readiness was derived from its assets.
# v2: readiness materialized as finetunes.state (backfilled), plus an index for list_public.
# v3: invalid_reason: set when an upload to a not-yet-ready finetune is refused (shown as state
#     "invalid"), cleared by its next accepted upload.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE accounts (
            id          TEXT PRIMARY KEY,
            name        TEXT NOT NULL,
            created_at  TEXT NOT NULL
        )""",
        """CREATE TABLE tokens (
            token_hash  TEXT PRIMARY KEY,          -- sha256(token) hex; the token itself is never stored
            account_id  TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
            created_at  TEXT NOT NULL
        )""",
        "CREATE INDEX tokens_account ON tokens(account_id)",
        """CREATE TABLE finetunes (
            id           TEXT PRIMARY KEY,
            account_id   TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
            name         TEXT NOT NULL,
            model        TEXT NOT NULL,
            description  TEXT NOT NULL DEFAULT '',
            public       INTEGER NOT NULL DEFAULT 0 CHECK (public IN (0, 1)),
            created_at   TEXT NOT NULL,
            modified_at  TEXT NOT NULL,
            UNIQUE (account_id, name)
        )""",
        """CREATE TABLE assets (
            finetune_id  TEXT NOT NULL REFERENCES finetunes(id) ON DELETE CASCADE,
            file_name    TEXT NOT NULL,
            size         INTEGER NOT NULL CHECK (size >= 0),
            sha256       TEXT NOT NULL,
            object_key   TEXT NOT NULL,
            created_at   TEXT NOT NULL,
            PRIMARY KEY (finetune_id, file_name)
        )""",
    ],
    [
        "ALTER TABLE finetunes ADD COLUMN state TEXT NOT NULL DEFAULT 'pending'"
        " CHECK (state IN ('pending', 'ready'))",
        """UPDATE finetunes SET state = 'ready' WHERE
            (SELECT count(*) FROM assets a WHERE a.finetune_id = finetunes.id
             AND a.file_name IN ('adapter_config.json', 'adapter_model.safetensors')) = 2""",
        "CREATE INDEX finetunes_public ON finetunes(public, created_at)",
    ],
    [
        "ALTER TABLE finetunes ADD COLUMN invalid_reason TEXT",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)


class Registry:
    """Accounts, tokens, finetunes and assets in one database; see the module docstring for the
    transaction, threading and tenancy contracts. Thread-safe: one connection per thread."""

    REQUIRED_FILES = REQUIRED_FILES

    def __init__(self, location: Path | str, *, max_finetunes_per_account: int = DEFAULT_MAX_FINETUNES_PER_ACCOUNT,
                 busy_timeout_s: float = 10.0):
        """Open the registry at `location` — a SQLite file path, or a `postgresql://` URL — creating
        it if needed, and migrate it to SCHEMA_VERSION. Raises RegistrySchemaError when its schema is
        newer than this code knows; errors.Unavailable when PostgreSQL cannot be reached."""
        if isinstance(max_finetunes_per_account, bool) or not isinstance(max_finetunes_per_account, int) \
                or max_finetunes_per_account < 0:
            raise ValueError(f"max_finetunes_per_account must be an int >= 0, got {max_finetunes_per_account!r}")
        self._db = SqlDatabase(location, MIGRATIONS, schema="registry", busy_timeout_s=busy_timeout_s,
                               what="the registry")
        self._backend: SqlBackend = self._db.backend
        self.location = location
        self.max_finetunes_per_account = max_finetunes_per_account
        # the transaction plumbing lives in registry_sql.SqlDatabase (shared with the training stores)
        self._conn, self._write, self._read = self._db.conn, self._db.write, self._db.read
        self._unavailable = self._db.unavailable

    def exclusive(self, name: str):
        """Hold the lock `name` against every other thread and process using this registry's
        database, waited for without a timeout, dropped if the process dies (registry_sql.py: a
        PostgreSQL advisory lock; a Linux file lock beside a SQLite file). Not re-entrant: never
        nest one name. errors.Unavailable when the database cannot be reached."""
        return self._db.exclusive(name)

    @property
    def backend(self) -> str:
        """"sqlite" or "postgresql"."""
        return self._db.kind

    def close(self) -> None:
        """Close every thread's connection. Call only when no call is in flight."""
        self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        return self._db.schema_version

    # --- accounts and tokens ----------------------------------------------------------------
    def create_account(self, name: str) -> tuple[str, str]:
        """Create an account and its first API token. Returns (account_id, token); the token is
        shown only here, the registry keeps its SHA-256. InvalidInput on an empty or overlong name."""
        check_text("account name", name)
        account_id = str(uuid.uuid4())
        token = secrets.token_urlsafe(32)
        now = utc_now()
        with self._write() as conn:
            conn.execute("INSERT INTO accounts (id, name, created_at) VALUES (?, ?, ?)", (account_id, name, now))
            conn.execute("INSERT INTO tokens (token_hash, account_id, created_at) VALUES (?, ?, ?)",
                         (hash_token(token), account_id, now))
        return account_id, token

    def create_token(self, account_id: str) -> str:
        """Issue another API token for an existing account (returned once; only its hash is kept).
        An unknown account → Unauthenticated."""
        token = secrets.token_urlsafe(32)
        with self._write() as conn:
            self._require_account(conn, account_id)
            conn.execute("INSERT INTO tokens (token_hash, account_id, created_at) VALUES (?, ?, ?)",
                         (hash_token(token), account_id, utc_now()))
        return token

    def list_accounts(self) -> list[tuple[str, str, str]]:
        """(account_id, name, created_at) of every account, oldest first (for operators' CLI)."""
        with self._read() as conn:
            rows = conn.execute(f"SELECT id, name, created_at FROM accounts ORDER BY created_at, {self._backend.ROW_ORDER}")
            return [tuple(r) for r in rows]

    def authenticate(self, token: str) -> str:
        """The account_id owning `token`, else Unauthenticated — for an empty,
        non-string, overlong, unknown or revoked token alike. The lookup is by SHA-256(token) and
        the stored digest is compared with hmac.compare_digest; timing can reveal at most bits of a
        hash of the attacker's own guess, never of a stored token."""
        failure = errors.Unauthenticated("authentication error: invalid or missing API token")
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            raise failure
        digest = hash_token(token)
        conn = self._conn()
        try:  # one statement, no transaction around it: one round trip
            row = conn.execute("SELECT token_hash, account_id FROM tokens WHERE token_hash = ?", (digest,)).fetchone()
        except Exception as e:
            if self._backend.is_unavailable(e):
                raise self._unavailable(e) from e
            raise
        if row is None or not hmac.compare_digest(row[0].encode("ascii"), digest.encode("ascii")):
            raise failure
        return row[1]

    def _require_account(self, conn: Connection, account_id: object, *, lock: bool = False) -> None:
        """The account exists (else Unauthenticated); with `lock`, its row stays locked until the
        transaction ends, which serializes the decisions about this account across processes."""
        if not storable(account_id) or conn.execute(
                "SELECT 1 FROM accounts WHERE id = ?" + (self._backend.FOR_UPDATE if lock else ""),
                (account_id,)).fetchone() is None:
            raise errors.Unauthenticated("authentication error: unknown account")

    # --- finetunes --------------------------------------------------------------------------
    def create_finetune(self, account_id: str, name: str, model: str, description: str = "",
                        public: bool = False) -> Finetune:
        """Create an empty ("pending") finetune owned by `account_id`. Errors: InvalidInput for a bad name,
        model or description, or a name the account already uses; LimitReached when the
        account already has `max_finetunes_per_account`; Unauthenticated for an unknown account."""
        check_name(name)
        check_text("model", model)
        check_text("description", description, allow_empty=True)
        if not isinstance(public, bool):
            raise invalid("public must be a boolean")
        finetune_id = str(uuid.uuid4())
        now = utc_now()
        with self._write() as conn:
            self._require_account(conn, account_id, lock=True)
            (count, unready) = conn.execute(
                "SELECT count(*), coalesce(sum(CASE WHEN state = 'ready' THEN 0 ELSE 1 END), 0) FROM finetunes"
                " WHERE account_id = ?", (account_id,)).fetchone()
            if count >= self.max_finetunes_per_account:
                raise errors.LimitReached(f"account limited: at most {self.max_finetunes_per_account} finetunes per "
                                          f"account, whatever their state ({unready} of yours are pending or invalid); "
                                          "delete one first")
            existing = self._named(conn, account_id, name)
            if existing:
                same = self._load(conn, existing)
                hint = ("" if same.state == "ready" else
                        f"; it is {same.state}: send the missing or corrected files to it, or delete it first")
                raise invalid(f"a finetune named {name!r} already exists in this account (id {same.id}){hint}")
            try:
                conn.execute(
                    "INSERT INTO finetunes (id, account_id, name, model, description, public, created_at,"
                    " modified_at, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending')",
                    (finetune_id, account_id, name, model, description, int(public), now, now))
            except Exception as e:  # the UNIQUE (account_id, name) constraint: the same refusal
                if self._backend.is_unique_violation(e):
                    raise invalid(f"a finetune named {name!r} already exists in this account") from None
                raise
            return self._load(conn, finetune_id)

    def list_finetunes(self, account_id: str) -> list[Finetune]:
        """The account's own finetunes (any state, private and public), oldest first."""
        with self._read() as conn:
            return self._load_many(conn, "f.account_id = ?", (account_id,))

    def list_public(self) -> list[Finetune]:
        """Every account's public finetunes (any state), oldest first."""
        with self._read() as conn:
            return self._load_many(conn, "f.public = 1", ())

    def get_finetune(self, account_id: str, id_or_name: str) -> Finetune:
        """The account's own finetune with this id, else its own with this name, else any public
        finetune with this id. Anything else (including another account's private one) → FinetuneNotFound."""
        with self._read() as conn:
            return self._load(conn, self._find(conn, account_id, id_or_name))

    def resolve_usable(self, account_id: str, id_or_name: str) -> Finetune:
        """Like get_finetune, but the finetune must be "ready": a pending or invalid one →
        AdapterFilesMissing naming the missing files (and why the last upload was refused). This is what
        inference calls before using an adapter."""
        finetune = self.get_finetune(account_id, id_or_name)
        if finetune.state != "ready":
            missing = ", ".join(finetune.missing_files) or "unknown"
            why = f" (invalid: {finetune.state_reason})" if finetune.state_reason else ""
            raise errors.AdapterFilesMissing(f"finetune {finetune.name!r} is missing files: {missing}{why}")
        return finetune

    def add_asset(self, account_id: str, finetune_id: str, file_name: str, size: int, sha256: str,
                  object_key: str, replace: bool = False) -> Finetune:
        """Record an uploaded file of the account's own finetune and return the updated finetune.
        A second upload of the same file name → InvalidInput, unless `replace` and the finetune is not
        ready yet (then the row is replaced; the caller deletes the old object if unused): assets
        of a ready finetune are immutable. InvalidInput too for a file name outside REQUIRED_FILES or a
        malformed size/sha256/object_key. The asset row, the switch to "ready" (once every
        required file is present), clearing "invalid" and the modified_at bump commit together.
        Another account's finetune: FinetuneNotFound if private, Forbidden if public."""
        if file_name not in self.REQUIRED_FILES:
            raise invalid(f"unsupported file {str(file_name)[:100]!r}: expected one of "
                           + ", ".join(self.REQUIRED_FILES))
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise invalid("size must be an integer >= 0")
        if not isinstance(sha256, str) or not SHA256_RE.fullmatch(sha256):
            raise invalid("sha256 must be 64 lowercase hex characters")
        check_text("object_key", object_key)
        with self._write() as conn:
            finetune_id, state = self._find_owned(conn, account_id, finetune_id)
            if conn.execute("SELECT 1 FROM assets WHERE finetune_id = ? AND file_name = ?",
                            (finetune_id, file_name)).fetchone():
                if not replace or state == "ready":
                    raise invalid(f"{file_name} was already uploaded for this finetune; assets are immutable"
                                   + (" once it is ready" if replace else ""))
                conn.execute("DELETE FROM assets WHERE finetune_id = ? AND file_name = ?", (finetune_id, file_name))
            conn.execute("INSERT INTO assets (finetune_id, file_name, size, sha256, object_key, created_at)"
                         " VALUES (?, ?, ?, ?, ?, ?)", (finetune_id, file_name, size, sha256, object_key, utc_now()))
            self._refresh_state(conn, finetune_id)
            return self._load(conn, finetune_id)

    def mark_invalid(self, account_id: str, finetune_id: str, reason: str) -> None:
        """Record why an upload to the account's own finetune was refused: it shows as "invalid"
        with `reason` (cut to 1000 characters) until its next accepted upload. A ready finetune
        keeps its state (nothing of it changed); an unknown or deleted one is ignored."""
        with self._write() as conn:
            conn.execute("UPDATE finetunes SET invalid_reason = ?, modified_at = ? WHERE id = ? AND account_id = ?"
                         " AND state != 'ready'", (printable(reason)[:1000], utc_now(), finetune_id, account_id))

    def delete_finetune(self, account_id: str, id_or_name: str) -> Finetune:
        """Delete the account's own finetune (by id or name) with its asset rows; returns what was
        deleted so the caller can delete the objects. Another account's: FinetuneNotFound if private or
        asked by name, Forbidden if public and asked by id."""
        with self._write() as conn:
            finetune_id, _ = self._find_owned(conn, account_id, id_or_name)
            deleted = self._load(conn, finetune_id)
            conn.execute("DELETE FROM finetunes WHERE id = ?", (finetune_id,))
            return deleted

    def object_key_in_use(self, object_key: str) -> bool:
        """Whether any finetune's asset points at `object_key` (content-addressed objects are
        shared by finetunes uploading the same bytes: delete an object only when this is False)."""
        if not storable(object_key):
            return False
        with self._read() as conn:
            return conn.execute("SELECT 1 FROM assets WHERE object_key = ? LIMIT 1", (object_key,)).fetchone() is not None

    # --- internals --------------------------------------------------------------------------
    def _refresh_state(self, conn: Connection, finetune_id: str) -> None:
        """Inside add_asset's transaction: bump modified_at; "ready" once every required file is in."""
        present = {r[0] for r in conn.execute("SELECT file_name FROM assets WHERE finetune_id = ?", (finetune_id,))}
        state = "ready" if present.issuperset(self.REQUIRED_FILES) else "pending"
        conn.execute("UPDATE finetunes SET state = ?, invalid_reason = NULL, modified_at = ? WHERE id = ?",
                     (state, utc_now(), finetune_id))

    def _named(self, conn: Connection, account_id: str, name: str) -> str | None:
        """Id of the account's finetune named `name`, if any."""
        row = conn.execute("SELECT id FROM finetunes WHERE account_id = ? AND name = ?", (account_id, name)).fetchone()
        return row[0] if row else None

    def _find(self, conn: Connection, account_id: object, id_or_name: object) -> str:
        """Id of the finetune `account_id` may read as `id_or_name`, else FinetuneNotFound."""
        if not storable(account_id) or not storable(id_or_name) or not id_or_name:
            raise not_found(id_or_name)
        row = conn.execute(
            "SELECT id, 0 AS rank FROM finetunes WHERE account_id = ? AND id = ? "
            "UNION ALL SELECT id, 1 FROM finetunes WHERE account_id = ? AND name = ? "
            "UNION ALL SELECT id, 2 FROM finetunes WHERE public = 1 AND id = ? ORDER BY rank LIMIT 1",
            (account_id, id_or_name, account_id, id_or_name, id_or_name)).fetchone()
        if row is None:
            if conn.execute("SELECT 1 FROM finetunes WHERE public = 1 AND name = ? LIMIT 1", (id_or_name,)).fetchone():
                raise errors.FinetuneNotFound(f"finetune {id_or_name[:100]!r} not found in this account; another "
                                              "account's public finetune is addressed by its id (GET …/finetunes/public "
                                              "lists them)")
            raise not_found(id_or_name)
        return row[0]

    def _find_owned(self, conn: Connection, account_id: object, id_or_name: object) -> tuple[str, str]:
        """(id, stored state) of `account_id`'s own finetune `id_or_name`, its row locked until the
        transaction ends: FinetuneNotFound if unreadable (or deleted meanwhile), Forbidden if only public."""
        finetune_id = self._find(conn, account_id, id_or_name)
        row = conn.execute("SELECT account_id, state FROM finetunes WHERE id = ?" + self._backend.FOR_UPDATE,
                           (finetune_id,)).fetchone()
        if row is None:  # deleted by another transaction while this one waited for the lock
            raise not_found(id_or_name)
        if row[0] != account_id:
            raise errors.Forbidden("forbidden: only the owning account can modify this finetune")
        return finetune_id, row[1]

    _COLUMNS = ("f.id, f.account_id, f.name, f.model, f.description, f.public, f.created_at, f.modified_at, f.state,"
                " f.invalid_reason")

    def _load(self, conn: Connection, finetune_id: str) -> Finetune:
        found = self._load_many(conn, "f.id = ?", (finetune_id,))
        if not found:
            raise not_found(finetune_id)
        return found[0]

    def _load_many(self, conn: Connection, where: str, params: tuple) -> list[Finetune]:
        # `where` is one of this class's constant fragments; values travel in `params`
        rows = conn.execute(f"SELECT {self._COLUMNS} FROM finetunes f WHERE {where}"
                            f" ORDER BY f.created_at, f.{self._backend.ROW_ORDER}", params).fetchall()
        assets: dict[str, dict[str, Asset]] = {r[0]: {} for r in rows}
        for fid, file_name, size, sha256, object_key in conn.execute(
                f"SELECT a.finetune_id, a.file_name, a.size, a.sha256, a.object_key FROM assets a "
                f"JOIN finetunes f ON f.id = a.finetune_id WHERE {where} ORDER BY a.file_name", params):
            assets[fid][file_name] = Asset(file_name, size, sha256, object_key)
        return [Finetune(id=r[0], account_id=r[1], name=r[2], model=r[3], description=r[4], public=bool(r[5]),
                         created_at=r[6], modified_at=r[7], state="invalid" if r[8] != "ready" and r[9] else r[8],
                         assets=assets[r[0]], state_reason=r[9] if r[8] != "ready" else None) for r in rows]


def open_registry(data_dir: Path, registry: str | None = None,
                  max_finetunes_per_account: int = DEFAULT_MAX_FINETUNES_PER_ACCOUNT) -> Registry:
    """The registry a server or an operator command uses: `registry` a `postgresql://` URL (shared
    by every server given it), or None/"" for `registry.sqlite` in `data_dir` (the default), or a
    SQLite file path."""
    if not registry:
        data_dir.mkdir(parents=True, exist_ok=True)
        return Registry(data_dir / "registry.sqlite", max_finetunes_per_account=max_finetunes_per_account)
    location = registry if is_postgres_url(registry) or "://" in registry else Path(registry).expanduser()
    return Registry(location, max_finetunes_per_account=max_finetunes_per_account)
