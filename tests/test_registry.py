"""The registry: accounts/tokens, finetunes, assets, tenancy, migrations, atomicity, threads and
processes — each test on both backends (`registry_location`: a SQLite file, and a fresh database
on the session's real PostgreSQL server) unless it is about SQLite's file itself."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from loraplex.config import DEFAULT_MAX_FINETUNES_PER_ACCOUNT
from loraplex.adapters.registry import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Registry,
    RegistrySchemaError,
)
from loraplex.api.errors import wire_of
from loraplex.errors import LimitReached, LoraplexError

CONFIG, WEIGHTS = Registry.REQUIRED_FILES
MODEL = "@cf/meta/llama-3.2-1b-instruct"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def db_path(tmp_path) -> Path:
    return tmp_path / "data" / "registry.sqlite3"


@pytest.fixture
def reg(registry_location):
    registry = Registry(registry_location)
    yield registry
    registry.close()


@contextmanager
def raw(location):
    """A plain connection to the registry's database, behind the registry's back (autocommit)."""
    conn = sqlite3.connect(location, isolation_level=None) if isinstance(location, Path) else \
        psycopg.connect(location, autocommit=True)
    try:
        yield conn
    finally:
        conn.close()


def raw_version(location) -> int:
    with raw(location) as conn:
        if isinstance(location, Path):
            return conn.execute("PRAGMA user_version").fetchone()[0]
        return conn.execute("SELECT version FROM registry_schema").fetchone()[0]


def table_count(location) -> int:
    with raw(location) as conn:
        if isinstance(location, Path):
            return conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
        return conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'").fetchone()[0]


def expect(code: int, status: int, fn, *args, **kwargs) -> LoraplexError:
    """fn refuses with a domain error that the API answers with `code` and `status`."""
    with pytest.raises(LoraplexError) as info:
        fn(*args, **kwargs)
    assert wire_of(info.value) == (code, status), info.value
    return info.value


def upload(reg: Registry, account: str, finetune_id: str, file_name: str):
    data = file_name.encode()
    return reg.add_asset(account, finetune_id, file_name, len(data), sha(data), f"objects/{finetune_id}/{file_name}")


def db_bytes(location) -> bytes:
    """Everything the database holds: the SQLite file plus its WAL (where not-yet-checkpointed pages
    live); every row of every table of the PostgreSQL database, as text."""
    if isinstance(location, Path):
        return b"".join(p.read_bytes() for p in (location, Path(f"{location}-wal")) if p.exists())
    with raw(location) as conn:
        tables = [r[0] for r in conn.execute("SELECT table_name FROM information_schema.tables"
                                             " WHERE table_schema = 'public'")]
        return "\n".join(str(row[0]) for t in tables for row in conn.execute(f'SELECT t::text FROM "{t}" t')).encode()


# --- accounts and tokens -----------------------------------------------------------------------
def test_accounts_and_tokens(reg, registry_location):
    alice, token = reg.create_account("alice")
    bob, bob_token = reg.create_account("Bob & Co")
    assert alice != bob and token != bob_token and len(token) >= 32
    assert reg.authenticate(token) == alice
    assert reg.authenticate(bob_token) == bob
    second = reg.create_token(alice)
    assert reg.authenticate(second) == alice
    assert [a[0] for a in reg.list_accounts()] == [alice, bob]
    for bad in ("", "x", token + "x", token[:-1], " " + token, "a" * 10_000, None, 123):
        err = expect(10000, 401, reg.authenticate, bad)
        assert token not in err.message
    expect(5004, 400, reg.create_account, "")
    expect(10000, 401, reg.create_token, "no-such-account")

    # only hashes are stored: the raw tokens appear nowhere in the file (nor the WAL)
    stored = db_bytes(registry_location)
    assert alice.encode() in stored  # sanity: the grep does see the data we wrote
    for t in (token, bob_token, second):
        assert t.encode() not in stored
        assert sha(t.encode()).encode() in stored
    reg.close()
    if isinstance(registry_location, Path):
        with sqlite3.connect(registry_location) as conn:  # and after a checkpoint into the main file
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert token.encode() not in registry_location.read_bytes()


def test_pragmas(db_path):
    reg = Registry(db_path)
    assert reg.backend == "sqlite"
    conn = reg._conn()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] > 0
    assert reg.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
    reg.close()


# --- finetunes ----------------------------------------------------------------------------------
def test_create_list_get(reg):
    alice, _ = reg.create_account("alice")
    ft = reg.create_finetune(alice, "my-lora_v1.0", MODEL, "a description")
    assert ft.account_id == alice and ft.name == "my-lora_v1.0" and ft.model == MODEL
    assert ft.description == "a description" and ft.public is False
    assert ft.state == "pending" and ft.assets == {} and ft.missing_files == (CONFIG, WEIGHTS)
    assert ft.created_at == ft.modified_at and ft.created_at.endswith("Z") and "T" in ft.created_at
    other = reg.create_finetune(alice, "other", MODEL, public=True)
    assert reg.get_finetune(alice, ft.id) == ft
    assert reg.get_finetune(alice, "my-lora_v1.0") == ft
    assert [f.id for f in reg.list_finetunes(alice)] == [ft.id, other.id]
    assert [f.id for f in reg.list_public()] == [other.id]
    expect(3037, 404, reg.get_finetune, alice, "nope")
    expect(3037, 404, reg.get_finetune, alice, "")


@pytest.mark.parametrize("name", ["", "a" * 65, "has space", "slash/name", "ünïcode", "semi;colon",
                                  "x'; DROP TABLE finetunes; --", "new\nline", "trail\n"])
def test_invalid_names_refused(reg, name):
    alice, _ = reg.create_account("alice")
    err = expect(5004, 400, reg.create_finetune, alice, name, MODEL)
    assert "name" in err.message
    assert reg.list_finetunes(alice) == []


def test_other_invalid_fields(reg):
    alice, _ = reg.create_account("alice")
    assert reg.create_finetune(alice, "a" * 64, MODEL).name == "a" * 64
    expect(5004, 400, reg.create_finetune, alice, "m", "")
    expect(5004, 400, reg.create_finetune, alice, "d", MODEL, "x" * 5000)
    expect(5004, 400, reg.create_finetune, alice, "p", MODEL, public="yes")
    expect(10000, 401, reg.create_finetune, "ghost", "g", MODEL)


def test_name_unique_per_account(reg):
    alice, _ = reg.create_account("alice")
    bob, _ = reg.create_account("bob")
    first = reg.create_finetune(alice, "shared", MODEL)
    err = expect(5004, 400, reg.create_finetune, alice, "shared", "another-model")
    assert "exists" in err.message
    theirs = reg.create_finetune(bob, "shared", MODEL)  # same name, another account: fine
    assert theirs.id != first.id
    assert reg.get_finetune(alice, "shared").id == first.id
    assert reg.get_finetune(bob, "shared").id == theirs.id
    assert reg.create_finetune(alice, "Shared", MODEL).name == "Shared"  # names are case-sensitive


@pytest.mark.parametrize("limit", [DEFAULT_MAX_FINETUNES_PER_ACCOUNT, 3])
def test_finetune_limit(registry_location, limit):
    kwargs = {} if limit == DEFAULT_MAX_FINETUNES_PER_ACCOUNT else {"max_finetunes_per_account": limit}
    reg = Registry(registry_location, **kwargs)
    alice, _ = reg.create_account("alice")
    bob, _ = reg.create_account("bob")
    made = [reg.create_finetune(alice, f"ft{i}", MODEL) for i in range(limit)]
    err = expect(3036, 429, reg.create_finetune, alice, f"ft{limit}", MODEL)
    assert str(limit) in err.message
    assert len(reg.list_finetunes(alice)) == limit
    reg.create_finetune(bob, "ft0", MODEL)  # the limit is per account
    reg.delete_finetune(alice, made[0].id)  # deleting frees a place
    reg.create_finetune(alice, f"ft{limit}", MODEL)
    expect(3036, 429, reg.create_finetune, alice, "one-more", MODEL)
    reg.close()


# --- tenancy ------------------------------------------------------------------------------------
def test_tenant_isolation(reg):
    alice, _ = reg.create_account("alice")
    mallory, _ = reg.create_account("mallory")
    private = reg.create_finetune(alice, "secret", MODEL)
    public = reg.create_finetune(alice, "shared", MODEL, public=True)
    for ft in (private, public):
        upload(reg, alice, ft.id, CONFIG)
        upload(reg, alice, ft.id, WEIGHTS)

    # a private finetune is invisible: every path says "not found", by id and by name
    for ref in (private.id, private.name):
        for fn in (reg.get_finetune, reg.resolve_usable, reg.delete_finetune):
            err = expect(3037, 404, fn, mallory, ref)
            assert "secret" not in err.message or ref == "secret"
    for file_name in (CONFIG, WEIGHTS):
        expect(3037, 404, reg.add_asset, mallory, private.id, file_name, 1, sha(b"x"), "k")
    assert reg.list_finetunes(mallory) == []
    assert [f.id for f in reg.list_public()] == [public.id]

    # a public one is readable (and usable) by id, not by name, and not writable
    assert reg.get_finetune(mallory, public.id).id == public.id
    assert reg.resolve_usable(mallory, public.id).id == public.id
    expect(3037, 404, reg.get_finetune, mallory, "shared")
    expect(10000, 403, reg.delete_finetune, mallory, public.id)
    expect(3037, 404, reg.delete_finetune, mallory, "shared")

    # a mallory finetune with the same name as alice's does not shadow or leak
    mine = reg.create_finetune(mallory, "secret", MODEL)
    assert reg.get_finetune(mallory, "secret").id == mine.id
    assert reg.get_finetune(alice, "secret").id == private.id

    # nothing changed for alice
    assert reg.get_finetune(alice, private.id) == reg.resolve_usable(alice, "secret")
    assert len(reg.list_finetunes(alice)) == 2


def test_public_not_writable_by_others(reg):
    alice, _ = reg.create_account("alice")
    mallory, _ = reg.create_account("mallory")
    public = reg.create_finetune(alice, "shared", MODEL, public=True)
    expect(10000, 403, reg.add_asset, mallory, public.id, CONFIG, 1, sha(b"x"), "k")
    assert reg.get_finetune(alice, public.id).assets == {}


# --- assets -------------------------------------------------------------------------------------
def test_assets_pending_to_ready(reg):
    alice, _ = reg.create_account("alice")
    ft = reg.create_finetune(alice, "lora", MODEL)
    err = expect(3039, 400, reg.resolve_usable, alice, "lora")
    assert CONFIG in err.message and WEIGHTS in err.message

    after_config = upload(reg, alice, ft.id, CONFIG)
    assert after_config.state == "pending" and set(after_config.assets) == {CONFIG}
    assert after_config.modified_at >= ft.modified_at
    asset = after_config.assets[CONFIG]
    assert (asset.size, asset.sha256, asset.object_key) == (len(CONFIG), sha(CONFIG.encode()), f"objects/{ft.id}/{CONFIG}")
    err = expect(3039, 400, reg.resolve_usable, alice, ft.id)
    assert WEIGHTS in err.message and CONFIG not in err.message

    # duplicates and unknown files are refused and change nothing
    err = expect(5004, 400, upload, reg, alice, ft.id, CONFIG)
    assert "already" in err.message
    for name in ("adapter_model.bin", "README.md", "../adapter_config.json", ""):
        expect(5004, 400, reg.add_asset, alice, ft.id, name, 1, sha(b"x"), "k")
    expect(5004, 400, reg.add_asset, alice, ft.id, WEIGHTS, -1, sha(b"x"), "k")
    expect(5004, 400, reg.add_asset, alice, ft.id, WEIGHTS, 1, "ABC", "k")
    expect(5004, 400, reg.add_asset, alice, ft.id, WEIGHTS, 1, sha(b"x"), "")
    expect(3037, 404, reg.add_asset, alice, "no-such-id", WEIGHTS, 1, sha(b"x"), "k")
    assert reg.get_finetune(alice, ft.id) == after_config

    ready = upload(reg, alice, ft.id, WEIGHTS)
    assert ready.state == "ready" and set(ready.assets) == {CONFIG, WEIGHTS} and ready.missing_files == ()
    assert ready.modified_at >= after_config.modified_at and ready.created_at == ft.created_at
    assert reg.resolve_usable(alice, "lora") == ready
    expect(5004, 400, upload, reg, alice, ft.id, WEIGHTS)  # immutable once ready, too


def test_delete(reg):
    alice, _ = reg.create_account("alice")
    ft = reg.create_finetune(alice, "lora", MODEL)
    upload(reg, alice, ft.id, CONFIG)
    keep = reg.create_finetune(alice, "keep", MODEL)
    deleted = reg.delete_finetune(alice, "lora")
    assert deleted.id == ft.id and set(deleted.assets) == {CONFIG}  # the caller deletes these objects
    for fn in (reg.get_finetune, reg.delete_finetune, reg.resolve_usable):
        expect(3037, 404, fn, alice, ft.id)
    assert [f.id for f in reg.list_finetunes(alice)] == [keep.id]
    assert reg._conn().execute("SELECT count(*) FROM assets").fetchone()[0] == 0  # cascaded
    again = reg.create_finetune(alice, "lora", MODEL)  # the name is free again
    assert again.id != ft.id and again.assets == {}


def test_persistence_across_reopen(registry_location):
    with Registry(registry_location) as reg:
        alice, token = reg.create_account("alice")
        ft = reg.create_finetune(alice, "lora", MODEL, "desc", public=True)
        upload(reg, alice, ft.id, CONFIG)
        ready = upload(reg, alice, ft.id, WEIGHTS)
    with Registry(registry_location) as reg:
        assert reg.authenticate(token) == alice
        assert reg.resolve_usable(alice, "lora") == ready
        assert reg.list_public() == [ready]


# --- schema migrations --------------------------------------------------------------------------
def test_migration_from_v1(db_path):
    db_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(db_path, isolation_level=None)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    token_hash = sha(b"old-token")
    now = "2025-01-01T00:00:00.000000Z"
    conn.execute("INSERT INTO accounts VALUES ('acct', 'old', ?)", (now,))
    conn.execute("INSERT INTO tokens VALUES (?, 'acct', ?)", (token_hash, now))
    for fid, name in (("f-ready", "complete"), ("f-half", "half")):
        conn.execute("INSERT INTO finetunes VALUES (?, 'acct', ?, ?, '', 0, ?, ?)", (fid, name, MODEL, now, now))
    for fid, file_name in (("f-ready", CONFIG), ("f-ready", WEIGHTS), ("f-half", WEIGHTS)):
        conn.execute("INSERT INTO assets VALUES (?, ?, 3, ?, ?, ?)", (fid, file_name, sha(b"abc"), f"k/{fid}", now))
    conn.close()

    with Registry(db_path) as reg:
        assert reg.schema_version == SCHEMA_VERSION == 3
        assert reg.authenticate("old-token") == "acct"
        assert reg.resolve_usable("acct", "complete").state == "ready"
        err = expect(3039, 400, reg.resolve_usable, "acct", "half")
        assert CONFIG in err.message
        assert reg.get_finetune("acct", "f-half").created_at == now
        assert upload(reg, "acct", "f-half", CONFIG).state == "ready"  # the upgraded file is writable
        columns = {r[1] for r in reg._conn().execute("PRAGMA table_info(finetunes)")}
        assert {"state", "invalid_reason"} <= columns
    with Registry(db_path) as reg:  # reopening an up-to-date file is a no-op
        assert reg.schema_version == SCHEMA_VERSION


def test_newer_schema_refused(registry_location):
    with Registry(registry_location) as reg:
        alice, _ = reg.create_account("alice")
        with reg._write() as conn:
            reg._backend.write_version(conn, SCHEMA_VERSION + 1)
    with pytest.raises(RegistrySchemaError, match="newer"):
        Registry(registry_location)
    assert raw_version(registry_location) == SCHEMA_VERSION + 1  # left untouched
    with raw(registry_location) as conn:
        assert conn.execute("SELECT id FROM accounts").fetchone()[0] == alice


def test_failed_migration_rolls_back(registry_location, monkeypatch):
    import loraplex.adapters.registry as registry_module

    monkeypatch.setattr(registry_module, "MIGRATIONS", MIGRATIONS + [["CREATE TABLE extra (x INTEGER)",
                                                                      "SELECT * FROM nope"]])
    monkeypatch.setattr(registry_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises((sqlite3.OperationalError, psycopg.errors.UndefinedTable)):
        Registry(registry_location)
    # not even the first migrations (nor PostgreSQL's version table) were kept: one transaction
    assert table_count(registry_location) == 0


# --- atomicity ----------------------------------------------------------------------------------
def test_add_asset_failure_mid_transaction(reg, monkeypatch):
    alice, _ = reg.create_account("alice")
    ft = reg.create_finetune(alice, "lora", MODEL)
    before = upload(reg, alice, ft.id, CONFIG)

    def boom(conn, finetune_id):  # runs after the asset INSERT, before the state UPDATE
        assert conn.execute("SELECT count(*) FROM assets").fetchone()[0] == 2  # the row is in, uncommitted
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(reg, "_refresh_state", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        upload(reg, alice, ft.id, WEIGHTS)
    monkeypatch.undo()
    assert reg.get_finetune(alice, ft.id) == before  # no asset row, still pending, same modified_at
    expect(3039, 400, reg.resolve_usable, alice, ft.id)
    assert upload(reg, alice, ft.id, WEIGHTS).state == "ready"  # and the registry is still usable


def test_crash_mid_add_asset(registry_location):
    """A process killed between add_asset's statements (no rollback, no close) leaves the previous state."""
    with Registry(registry_location) as reg:
        alice, _ = reg.create_account("alice")
        ft = reg.create_finetune(alice, "lora", MODEL)
        before = upload(reg, alice, ft.id, CONFIG)
    script = textwrap.dedent(f"""
        import os, sys
        from loraplex.adapters.registry import Registry
        reg = Registry({str(registry_location)!r})
        def crash(conn, finetune_id):
            sys.stdout.flush()
            os._exit(17)
        reg._refresh_state = crash
        reg.add_asset({alice!r}, {ft.id!r}, {WEIGHTS!r}, 5, {sha(b"w")!r}, "k")
        """)
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent.parent, timeout=60)
    assert result.returncode == 17
    with Registry(registry_location) as reg:
        assert reg.get_finetune(alice, ft.id) == before
        expect(3039, 400, reg.resolve_usable, alice, "lora")


def test_delete_failure_keeps_finetune(reg, monkeypatch):
    alice, _ = reg.create_account("alice")
    ft = reg.create_finetune(alice, "lora", MODEL)
    upload(reg, alice, ft.id, CONFIG)
    real_load = reg._load
    monkeypatch.setattr(reg, "_load", lambda conn, fid: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        reg.delete_finetune(alice, ft.id)
    monkeypatch.setattr(reg, "_load", real_load)
    assert set(reg.get_finetune(alice, ft.id).assets) == {CONFIG}


# --- threads ------------------------------------------------------------------------------------
def test_concurrent_creates_respect_limit(registry_location):
    reg = Registry(registry_location, max_finetunes_per_account=30)
    alice, token = reg.create_account("alice")
    results: dict[str, list] = {"ok": [], "limited": [], "other": []}
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker(t: int) -> None:
        start.wait()
        for i in range(6):  # 48 attempts in all
            try:
                ft = reg.create_finetune(alice, f"t{t}-{i}", MODEL)
                assert reg.authenticate(token) == alice
                reg.get_finetune(alice, ft.id)
                key, value = "ok", ft.id
            except LoraplexError as err:
                key, value = ("limited" if isinstance(err, LimitReached) else "other"), err
            except Exception as err:  # noqa: BLE001 — e.g. "database is locked" would land here
                key, value = "other", err
            with lock:
                results[key].append(value)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results["other"] == []
    assert len(results["ok"]) == 30 and len(set(results["ok"])) == 30
    assert len(results["limited"]) == 18
    assert sorted(f.id for f in reg.list_finetunes(alice)) == sorted(results["ok"])
    reg.close()


def test_concurrent_uploads_one_finetune(reg):
    """Both files uploaded at once from two threads: exactly one becomes ready, none lost."""
    alice, _ = reg.create_account("alice")
    fts = [reg.create_finetune(alice, f"ft{i}", MODEL) for i in range(10)]
    errors: list[Exception] = []

    def worker(file_name: str) -> None:
        try:
            for ft in fts:
                upload(reg, alice, ft.id, file_name)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(f,)) for f in (CONFIG, WEIGHTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert all(f.state == "ready" and len(f.assets) == 2 for f in reg.list_finetunes(alice))


def test_lookup_order_own_id_then_own_name_then_public_id(reg):
    alice, _ = reg.create_account("alice")
    mallory, _ = reg.create_account("mallory")
    public = reg.create_finetune(alice, "shared", MODEL, public=True)
    assert reg.get_finetune(mallory, public.id).id == public.id
    shadow = reg.create_finetune(mallory, public.id, MODEL)  # a name that looks like someone's id
    assert reg.get_finetune(mallory, public.id).id == shadow.id  # own name beats another's public id
    named_like_id = reg.create_finetune(alice, shadow.id, MODEL)
    assert reg.get_finetune(alice, shadow.id).id == named_like_id.id  # not mallory's private one
    assert reg.get_finetune(alice, public.id).id == public.id  # own id beats nothing else


def test_unique_violation_is_the_name_refusal(reg, monkeypatch):
    """Should the name check ever be skipped, the UNIQUE (account, name) constraint refuses the same
    way (400 / 5004), the transaction is rolled back and the registry stays usable."""
    alice, _ = reg.create_account("alice")
    first = reg.create_finetune(alice, "lora", MODEL)
    monkeypatch.setattr(reg, "_named", lambda conn, account_id, name: None)
    err = expect(5004, 400, reg.create_finetune, alice, "lora", MODEL)
    assert "already exists" in err.message
    monkeypatch.undo()
    assert [f.id for f in reg.list_finetunes(alice)] == [first.id]
    assert reg.create_finetune(alice, "other", MODEL).name == "other"


# --- processes ----------------------------------------------------------------------------------
RACER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from loraplex.adapters.registry import Registry
    from loraplex.errors import LimitReached, LoraplexError

    location, limit, k, account, uploader, fts, ready, go = json.loads(sys.argv[1])
    reg = Registry(location, max_finetunes_per_account=limit)
    Path(ready).touch()
    while not Path(go).exists():
        time.sleep(0.005)
    out = []
    for name in ["same"] + [f"p{k}-{i}" for i in range(3)]:
        try:
            out.append(["ok", name, reg.create_finetune(account, name, "m").id])
        except LimitReached:
            out.append(["limit", name])
        except LoraplexError as e:
            out.append(["refused", name, e.message])
    file_name = Registry.REQUIRED_FILES[k]  # process 0 sends every config, process 1 every weights file
    for fid in fts:
        reg.add_asset(uploader, fid, file_name, 1, "%064x" % k, f"objects/{fid}/{file_name}")
    print(json.dumps(out))
    """)


def test_two_processes_race_for_the_limit_a_name_and_one_finetune(registry_location, tmp_path):
    """Two processes on one database at once: both create "same" and then 3 names of their own for
    one account limited to 6 — exactly 6 succeed: one "same" (the other is a name refusal: at most 4
    exist when the later "same" is tried, whatever the interleaving) and all but one of the others
    (LimitReached). Then each sends one of the two files of the same 6 finetunes of another account:
    every one ends ready with both assets (the pending → ready switch sees the other process's
    commit). Nothing else is written."""
    limit = 6
    with Registry(registry_location, max_finetunes_per_account=limit) as reg:
        account, _ = reg.create_account("racer")
        uploader, _ = reg.create_account("uploader")
        fts = [reg.create_finetune(uploader, f"u{i}", MODEL).id for i in range(limit)]
    go = tmp_path / "go"
    procs = []
    for k in (0, 1):
        args = [str(registry_location), limit, k, account, uploader, fts, str(tmp_path / f"ready{k}"), str(go)]
        procs.append(subprocess.Popen([sys.executable, "-c", RACER, json.dumps(args)], stdout=subprocess.PIPE,
                                      cwd=Path(__file__).parent.parent, text=True))
    for k, proc in enumerate(procs):  # both opened the registry (and migrated it) before either starts
        while not (tmp_path / f"ready{k}").exists():
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.01)
    go.touch()
    outcomes = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        outcomes += json.loads(out)

    made = {o[2]: o[1] for o in outcomes if o[0] == "ok"}
    assert len(made) == limit
    assert sorted(o[0] for o in outcomes if o[1] == "same") == ["ok", "refused"]
    assert "already exists" in next(o[2] for o in outcomes if o[1] == "same" and o[0] == "refused")
    assert [o[0] for o in outcomes if o[1] != "same" and o[0] != "ok"] == ["limit"]
    with Registry(registry_location, max_finetunes_per_account=limit) as reg:
        listed = reg.list_finetunes(account)
        assert {f.id: f.name for f in listed} == made
        assert all(f.state == "pending" and f.assets == {} for f in listed)  # whole rows, nothing else
        uploaded = reg.list_finetunes(uploader)
        assert [f.id for f in uploaded] == fts
        assert all(f.state == "ready" and set(f.assets) == {CONFIG, WEIGHTS} for f in uploaded)
        expect(3036, 429, reg.create_finetune, account, "one-more", MODEL)


# --- choosing the backend -----------------------------------------------------------------------
def test_open_registry_chooses_the_backend(tmp_path, postgres_url, capsys, monkeypatch):
    from loraplex.adapters.registry import open_registry
    from loraplex.cli import main
    from loraplex.errors import Unavailable

    # the operator command takes the same flag: the account lands in PostgreSQL, not the data dir
    monkeypatch.setenv("LORAPLEX_DATA_DIR", str(tmp_path / "cli"))  # main() points it at --data-dir; restored after
    assert main(["accounts", "create", "op", "--registry", postgres_url, "--data-dir", str(tmp_path / "cli")]) == 0
    created = json.loads(capsys.readouterr().out)
    with open_registry(tmp_path / "unused", postgres_url) as reg:
        assert reg.authenticate(created["token"]) == created["account_id"]
    assert not (tmp_path / "cli" / "registry.sqlite").exists()

    with open_registry(tmp_path / "data") as reg:  # the default: registry.sqlite in the data dir
        assert reg.backend == "sqlite" and (tmp_path / "data" / "registry.sqlite").is_file()
    with open_registry(tmp_path / "data", postgres_url, max_finetunes_per_account=2) as reg:
        assert reg.backend == "postgresql" and reg.max_finetunes_per_account == 2
        assert reg.schema_version == SCHEMA_VERSION
    assert not (tmp_path / "data2").exists()
    with pytest.raises(ValueError, match="postgresql://"):
        open_registry(tmp_path / "data", "mysql://db/loraplex")
    # a server that is not there: the domain's Unavailable (503 / 3040 over HTTP), not a driver error
    gone = postgres_url.split("?")[0] + f"?host={tmp_path / 'no-server'}"
    with pytest.raises(Unavailable, match="the registry is unavailable"):
        open_registry(tmp_path / "data", gone)


def test_postgresql_connections_lost_are_replaced(postgres_url):
    """The server ends the registry's connection (a restart, a failover): the call that finds it
    gone is Unavailable, the next one reconnects and sees everything committed before."""
    from loraplex.errors import Unavailable

    with Registry(postgres_url) as reg:
        alice, token = reg.create_account("alice")
        with raw(postgres_url) as admin:
            ended = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                                  " WHERE application_name = 'loraplex-registry'").fetchone()[0]
        assert ended == 1
        with pytest.raises(Unavailable):
            reg.list_finetunes(alice)
        assert reg.authenticate(token) == alice
        assert reg.create_finetune(alice, "after", MODEL).name == "after"


HOLDER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from loraplex.adapters.registry import Registry

    location, held, release, done = json.loads(sys.argv[1])
    reg = Registry(location)
    with reg.exclusive("finetune/x"):
        Path(held).touch()
        while not Path(release).exists():
            time.sleep(0.005)
        Path(done).touch()  # the last thing done under the lock
    """)


def test_exclusive_excludes_another_process_and_thread(registry_location, tmp_path):
    """A named lock held by another process is waited for: taken here only after that process's
    last step under it. Two threads of this process exclude each other too; other names are free.
    (The short pauses only give a broken lock the chance to be taken early; nothing is timed.)"""
    held, release, done = (tmp_path / n for n in ("held", "release", "done"))
    notes: list[str] = []

    def take(reg: Registry, name: str, note) -> threading.Thread:
        def run():
            with reg.exclusive(name):
                notes.append(note())
        thread = threading.Thread(target=run)
        thread.start()
        return thread

    with Registry(registry_location) as reg:
        holder = subprocess.Popen([sys.executable, "-c", HOLDER,
                                   json.dumps([str(registry_location), str(held), str(release), str(done)])],
                                  cwd=Path(__file__).parent.parent)
        while not held.exists():
            assert holder.poll() is None
            time.sleep(0.01)
        with reg.exclusive("finetune/y"):  # another name: not blocked
            pass
        waiter = take(reg, "finetune/x", lambda: f"in after the other process: {done.exists()}")
        time.sleep(0.2)
        release.touch()
        waiter.join(timeout=60)
        assert holder.wait(timeout=60) == 0
        assert notes == ["in after the other process: True"]

        notes.clear()
        first_in, let_go = threading.Event(), threading.Event()

        def first_note() -> str:
            first_in.set()
            let_go.wait(60)
            return "first out"

        first = take(reg, "finetune/z", first_note)
        assert first_in.wait(60)
        second = take(reg, "finetune/z", lambda: "second in")
        time.sleep(0.2)
        let_go.set()
        first.join(60)
        second.join(60)
        assert notes == ["first out", "second in"]
