"""Finetune assets: stage an upload on disk, validate it, store it, record it (blocking: run in a
worker thread). Nothing is recorded unless it was validated and is safely in the object store, so
a finetune is usable only once both files passed the same validation that serving applies.

Objects are content-addressed and may be shared by finetunes that uploaded the same bytes; a
per-key lock orders "store + record" against "check unused + delete", so a delete never removes
an object that an upload is about to reference. (Locks are per process: run one API process per
registry file.)
"""

from __future__ import annotations

import hashlib
import json
import mmap
import shutil
import tempfile
import threading
import uuid
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from loraplex.adapters.cache import CONFIG_FILE, WEIGHTS_FILE
from loraplex.adapters.registry import Finetune, Registry
from loraplex.adapters.storage import CHUNK_SIZE, key_for
from loraplex.api.context import ApiContext
from loraplex.api.errors import ApiError, invalid
from loraplex.lora.adapter import load_adapter
from loraplex.lora.safetensors_check import SafetensorsFormatError, check_header


class KeyLocks:
    """One lock per object key, created on demand and dropped when unused."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._users: defaultdict[str, int] = defaultdict(int)

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
            self._users[key] += 1
        try:
            with lock:
                yield
        finally:
            with self._guard:
                self._users[key] -= 1
                if not self._users[key]:
                    del self._users[key], self._locks[key]


LOCKS = KeyLocks()


def check_file_name(file_name: object) -> str:
    if not isinstance(file_name, str) or file_name not in Registry.REQUIRED_FILES:
        shown = str(file_name)[:100] if isinstance(file_name, str) else type(file_name).__name__
        raise invalid(f"file_name {shown!r} is not accepted: upload exactly "
                      + " and ".join(Registry.REQUIRED_FILES) + " (plain names, no folders)")
    return file_name


def _stage(src: BinaryIO, folder: Path, limit: int) -> tuple[Path, int, str]:
    """Copy the upload into `folder` while hashing it; 413 / 3006 past `limit` bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    staged = folder / f"upload-{uuid.uuid4().hex}"
    digest, size = hashlib.sha256(), 0
    try:
        with open(staged, "wb") as out:
            while chunk := src.read(CHUNK_SIZE):
                size += len(chunk)
                if size > limit:
                    raise ApiError(3006, f"file too large: the limit is {limit} bytes", 413)
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return staged, size, digest.hexdigest()


def _check_alone(file_name: str, staged: Path, size: int) -> None:
    """What one file can be checked for without the other."""
    if size == 0:
        raise invalid(f"{file_name} is empty")
    if file_name == CONFIG_FILE:
        try:
            config = json.loads(staged.read_bytes())
        except (ValueError, RecursionError):
            raise invalid("adapter_config.json is not valid JSON") from None
        if not isinstance(config, dict):
            raise invalid("adapter_config.json must hold a JSON object")
        return
    with open(staged, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            check_header(memoryview(data))
        except SafetensorsFormatError as e:
            raise invalid(f"adapter_model.safetensors is corrupt: {e}") from None


def _check_pair(ctx: ApiContext, finetune: Finetune, file_name: str, staged: Path) -> None:
    """With the other file already stored: the full validation serving applies (AdapterError)."""
    other = CONFIG_FILE if file_name == WEIGHTS_FILE else WEIGHTS_FILE
    with tempfile.TemporaryDirectory(dir=ctx.upload_dir) as tmp:
        folder = Path(tmp)
        ctx.store.fetch_to(finetune.assets[other].object_key, folder / other)
        shutil.copyfile(staged, folder / file_name)
        load_adapter(folder, ctx.model_args, name=finetune.name, max_rank=ctx.limits.max_lora_rank,
                     max_file_bytes=ctx.limits.max_adapter_bytes)


def store_asset(ctx: ApiContext, account_id: str, finetune: Finetune, file_name: str, src: BinaryIO) -> Finetune:
    """Validate, store and record one uploaded file of `finetune`; returns the updated finetune.
    Uploads to one finetune are serialized, so the second file is always checked with the first."""
    if file_name in finetune.assets:
        raise _immutable(file_name)
    limit = ctx.limits.max_config_bytes if file_name == CONFIG_FILE else ctx.limits.max_adapter_bytes
    staged, size, sha256 = _stage(src, ctx.upload_dir, limit)
    try:
        _check_alone(file_name, staged, size)
        with LOCKS.hold(f"finetune/{finetune.id}"):
            finetune = ctx.registry.get_finetune(account_id, finetune.id)
            if file_name in finetune.assets:
                raise _immutable(file_name)
            if finetune.missing_files == (file_name,):
                _check_pair(ctx, finetune, file_name, staged)
            key = key_for(sha256)
            with LOCKS.hold(key):
                ctx.store.put_file(staged)
                return ctx.registry.add_asset(account_id, finetune.id, file_name, size, sha256, key)
    finally:
        staged.unlink(missing_ok=True)


def _immutable(file_name: str) -> ApiError:
    return invalid(f"{file_name} was already uploaded for this finetune; assets are immutable")


def delete_unused_objects(ctx: ApiContext, finetune: Finetune) -> None:
    """After `finetune` was deleted from the registry: delete its objects no other finetune uses."""
    for asset in finetune.assets.values():
        with LOCKS.hold(asset.object_key):
            if not ctx.registry.object_key_in_use(asset.object_key):
                ctx.store.delete(asset.object_key)
