"""Every LORAPLEX_* environment variable, read here and nowhere else."""

from __future__ import annotations

import os
from pathlib import Path

from loraplex.config import DEFAULT_DATA_DIR, DEFAULT_HOST, DEFAULT_PORT


DEFAULT_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"
DATA_DIR_HELP = f"$LORAPLEX_DATA_DIR, else {DEFAULT_DATA_DIR}"
API_URL_HELP = f"$LORAPLEX_URL, else {DEFAULT_URL}"
REGISTRY_HELP = "$LORAPLEX_REGISTRY, else registry.sqlite in the data dir"


def data_dir() -> Path:
    """LORAPLEX_DATA_DIR: where converted models, the registry and caches live. The one place that
    decides the default data dir: the server, the CLI and the offline `LLM` all call it, so they
    share one converted copy of the default model."""
    return Path(os.environ.get("LORAPLEX_DATA_DIR") or DEFAULT_DATA_DIR).expanduser()


def attention_backend() -> str | None:
    """LORAPLEX_ATTENTION: force a decode attention backend ("torch", "cpu_inplace" or "triton"); None = automatic."""
    return os.environ.get("LORAPLEX_ATTENTION") or None


def use_data_dir(path: Path) -> None:
    """Point LORAPLEX_DATA_DIR at `path` for this process (the CLI's --data-dir)."""
    os.environ["LORAPLEX_DATA_DIR"] = str(path)


def api_url() -> str:
    """LORAPLEX_URL: the server the client commands talk to."""
    return os.environ.get("LORAPLEX_URL") or DEFAULT_URL


def account_id() -> str | None:
    """LORAPLEX_ACCOUNT_ID: the account the client commands act for."""
    return os.environ.get("LORAPLEX_ACCOUNT_ID") or None


def api_token() -> str | None:
    """LORAPLEX_API_TOKEN: the API token the client commands send."""
    return os.environ.get("LORAPLEX_API_TOKEN") or None


def registry() -> str | None:
    """LORAPLEX_REGISTRY: the registry `serve` and `accounts` open when --registry is not given: a
    postgresql:// URL (keeps its password out of the process list), else registry.sqlite in the data dir."""
    return os.environ.get("LORAPLEX_REGISTRY") or None


def admin_token() -> str | None:
    """LORAPLEX_ADMIN_TOKEN: the bearer token of the operator routes (/admin/…); unset, they do not exist."""
    return os.environ.get("LORAPLEX_ADMIN_TOKEN") or None
