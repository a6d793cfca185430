"""Every LORAPLEX_* environment variable, read here and nowhere else."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """LORAPLEX_DATA_DIR: where converted models, the registry and caches live."""
    return Path(os.environ.get("LORAPLEX_DATA_DIR", Path.home() / ".local" / "share" / "loraplex"))


def attention_backend() -> str | None:
    """LORAPLEX_ATTENTION: force an attention backend ("torch" or "cpu_inplace"); None = automatic."""
    return os.environ.get("LORAPLEX_ATTENTION") or None
