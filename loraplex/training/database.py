"""The fine-tuning state's database: files, jobs and their events, request logs and per-account
log settings, kept beside the registry so that every server sharing the registry shares them.

Where: `open_training_db(data_dir, registry)` → the same PostgreSQL database as a
`postgresql://` registry (schema `training`, its version in `training_schema`), else the SQLite
file `training.sqlite` in the data dir (a SQLite registry file given by path: beside that file,
so servers sharing it share this too). The plumbing (connections per thread, transactions, the
isolation each backend gives, migrations, errors.Unavailable) is registry_sql.SqlDatabase's.

Every table's name starts with `training_` (one namespace beside the registry's tables; an
unversioned `training.sqlite` of an older loraplex keeps its old tables, unused).
`MIGRATIONS[i]` takes the schema from version i to i + 1; the same statements on both databases
(`$SERIAL_KEY`: an auto-numbered integer key, which orders rows by insertion on both). Times are
integers (unix seconds or milliseconds, BIGINT) or DOUBLE PRECISION unix seconds.
"""

from __future__ import annotations

from pathlib import Path

from loraplex.adapters.registry_sql import SqlDatabase, is_postgres_url

__all__ = ["MIGRATIONS", "open_training_db"]

MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE training_files (
            id          TEXT PRIMARY KEY,
            account     TEXT NOT NULL,
            purpose     TEXT NOT NULL,
            filename    TEXT NOT NULL,
            bytes       BIGINT NOT NULL,
            examples    BIGINT NOT NULL,
            created_at  BIGINT NOT NULL,
            object_key  TEXT NOT NULL       -- the content, in the server's object store
        )""",
        "CREATE INDEX training_files_account ON training_files (account, created_at)",
        """CREATE TABLE training_jobs (
            seq              $SERIAL_KEY,
            id               TEXT NOT NULL UNIQUE,
            account          TEXT NOT NULL,
            model            TEXT NOT NULL,
            training_file    TEXT NOT NULL,
            validation_file  TEXT,
            suffix           TEXT,
            seed             BIGINT NOT NULL,
            hyperparameters  TEXT NOT NULL,
            status           TEXT NOT NULL,
            created_at       BIGINT NOT NULL,
            started_at       DOUBLE PRECISION,
            finished_at      BIGINT,
            fine_tuned_model TEXT,
            error            TEXT,
            trained_tokens   BIGINT,
            trainer          TEXT,             -- the trainer running it (JobStore: claim, lease)
            lease_until      DOUBLE PRECISION  -- unix seconds; past it, the trainer counts as gone
        )""",
        "CREATE INDEX training_jobs_status ON training_jobs (status)",
        "CREATE INDEX training_jobs_account ON training_jobs (account, started_at)",
        """CREATE TABLE training_job_events (
            seq         $SERIAL_KEY,
            job         TEXT NOT NULL,
            created_at  BIGINT NOT NULL,
            level       TEXT NOT NULL,
            message     TEXT NOT NULL,
            data        TEXT
        )""",
        "CREATE INDEX training_job_events_job ON training_job_events (job, seq)",
        """CREATE TABLE training_request_logs (
            seq                $SERIAL_KEY,
            id                 TEXT NOT NULL UNIQUE,
            account            TEXT NOT NULL,
            created_ms         BIGINT NOT NULL,
            model              TEXT NOT NULL,
            finetune           TEXT,
            dialect            TEXT NOT NULL,
            messages           TEXT NOT NULL,
            prompt             TEXT,
            response           TEXT NOT NULL,
            prompt_tokens      BIGINT NOT NULL,
            completion_tokens  BIGINT NOT NULL,
            duration_ms        BIGINT NOT NULL,
            finish_reason      TEXT,
            feedback           INTEGER,
            corrected_response TEXT
        )""",
        "CREATE INDEX training_request_logs_account ON training_request_logs (account, created_ms)",
        """CREATE TABLE training_log_settings (
            account         TEXT PRIMARY KEY,
            enabled         INTEGER NOT NULL CHECK (enabled IN (0, 1)),
            retention_days  INTEGER NOT NULL
        )""",
    ],
]


def training_location(data_dir: Path, registry: str | Path | None = None) -> Path | str:
    """Where the training state lives for a server whose registry is `registry` (see module doc)."""
    if registry and is_postgres_url(str(registry)):
        return str(registry)
    if registry and "://" not in str(registry):
        return Path(registry).expanduser().parent / "training.sqlite"
    return Path(data_dir) / "training.sqlite"


def open_training_db(data_dir: Path, registry: str | Path | None = None, busy_timeout_s: float = 10.0) -> SqlDatabase:
    """The training database of a server (created and migrated if needed). RegistrySchemaError
    when its schema is newer than this code; errors.Unavailable when PostgreSQL cannot be reached."""
    return SqlDatabase(training_location(data_dir, registry), MIGRATIONS, schema="training",
                       busy_timeout_s=busy_timeout_s, what="the fine-tuning store")
