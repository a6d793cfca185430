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
