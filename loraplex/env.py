"""Every LORAPLEX_* environment variable, read here and nowhere else."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """LORAPLEX_DATA_DIR: where converted models, the registry and caches live."""
    return Path(os.environ.get("LORAPLEX_DATA_DIR", Path.home() / ".local" / "share" / "loraplex"))


def attention_backend() -> str | None:
    """LORAPLEX_ATTENTION: force a decode attention backend ("torch", "cpu_inplace" or "triton"); None = automatic."""
    return os.environ.get("LORAPLEX_ATTENTION") or None


def use_data_dir(path: Path) -> None:
    """Point LORAPLEX_DATA_DIR at `path` for this process (the CLI's --data-dir)."""
    os.environ["LORAPLEX_DATA_DIR"] = str(path)


def api_url() -> str:
    """LORAPLEX_URL: the server the client commands talk to."""
    return os.environ.get("LORAPLEX_URL", "http://127.0.0.1:8787")


def account_id() -> str | None:
    """LORAPLEX_ACCOUNT_ID: the account the client commands act for."""
    return os.environ.get("LORAPLEX_ACCOUNT_ID") or None


def api_token() -> str | None:
    """LORAPLEX_API_TOKEN: the API token the client commands send."""
    return os.environ.get("LORAPLEX_API_TOKEN") or None
