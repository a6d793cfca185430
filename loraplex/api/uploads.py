"""Finetune assets: stage an upload on disk, validate it, store it, record it (blocking: run in a
worker thread). Nothing is recorded unless it was validated and is safely in the object store, so
a finetune is usable only once both files passed the same validation that serving applies.

Contracts:

- Validation: each file alone as far as it can be (the config fully against the base model; the
  weights' safetensors header, read without mapping the file, with the header capped at what an
  adapter of the served model can need), then both together exactly as serving loads them.
- States: a refused file leaves the finetune "invalid" with the refusal as its reason (unless it
  is ready); re-sending a corrected file replaces the stored one until the finetune is ready,
  after which its assets are immutable.
- Objects are content-addressed and may be shared by finetunes that uploaded the same bytes. A
  per-key lock orders "store + record" against "check unused + delete", so a delete never removes
  an object that an upload is about to reference; an upload whose record fails (its finetune was
  deleted meanwhile) removes its object again unless something else uses it: nothing is orphaned.
- Locks: each is an in-process lock plus the registry's cross-process one (`Registry.exclusive`: a
  PostgreSQL advisory lock, or a file lock beside a SQLite registry), so servers sharing one
  registry take turns too. Order: a finetune's lock, then one object key's; never one name twice.
- No cross-tenant oracle: every accepted file is written to the store, whether or not those
  bytes are stored already, so an upload takes the same work whoever else uploaded the bytes.
"""

from __future__ import annotations

import hashlib
import json
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
from loraplex.api.errors import ApiError, as_api_error, invalid
from loraplex.errors import AdapterInvalid
from loraplex.lora.adapter import check_config_file, load_adapter, max_header_bytes
from loraplex.lora.safetensors_check import SafetensorsFormatError, check_file

# refusals that are about the uploaded file itself (its content or size): they mark the finetune invalid
CONTENT_REFUSALS = (5004, 3006)


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


@contextmanager
def _held(ctx: ApiContext, name: str) -> Iterator[None]:
    """The lock `name` in this process, then across every process sharing the registry."""
    with LOCKS.hold(name), ctx.registry.exclusive(name):
        yield


def check_file_name(file_name: object) -> str:
    """The multipart `file_name` field, which must be one of Registry.REQUIRED_FILES."""
    accepted = " or ".join(Registry.REQUIRED_FILES)
    if file_name is None:
        raise invalid(f"the multipart field `file_name` is missing: send file_name={accepted} with the file")
    if not isinstance(file_name, str) or file_name not in Registry.REQUIRED_FILES:
        shown = repr(file_name[:100]) if isinstance(file_name, str) else "a file part"
        raise invalid(f"file_name {shown} is not accepted: upload exactly "
                      + " and ".join(Registry.REQUIRED_FILES) + " (plain names, no folders, as a text field)")
    return file_name


def _stage(ctx: ApiContext, src: BinaryIO, file_name: str, limit: int) -> tuple[Path, int, str]:
    """Copy the upload into a fresh folder under the upload dir, as `file_name`, while hashing it;
    413 / 3006 past `limit` bytes (saying so when the part received holds full-weight modules).
    The caller removes the staged file's folder."""
    staged = ctx.upload_dir / f"upload-{uuid.uuid4().hex}" / file_name
    staged.parent.mkdir(parents=True)
    digest, size = hashlib.sha256(), 0
    try:
        with open(staged, "wb") as out:
            while chunk := src.read(CHUNK_SIZE):
                size += len(chunk)
                if size > limit:
                    out.write(chunk[: len(chunk) - (size - limit)])  # up to the limit: its header explains
                    out.close()
                    raise ApiError(3006, f"{file_name} too large: the limit is {limit} bytes"
                                   + _full_weight_hint(ctx, staged), 413)
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        shutil.rmtree(staged.parent, ignore_errors=True)
        raise
    return staged, size, digest.hexdigest()


def _full_weight_tensors(names) -> list[str]:
    """Names of tensors that are whole modules (PEFT's modules_to_save), not LoRA factors."""
    return [n for n in names if "modules_to_save" in n.split(".") or n.endswith(("lm_head.weight", "embed_tokens.weight"))]


def _full_weight_hint(ctx: ApiContext, partial: Path) -> str:
    """Why a weights file is so large, read from the header of the part received: full-weight
    modules (modules_to_save) are the usual cause, and are not supported anyway. '' otherwise."""
    if partial.name != WEIGHTS_FILE:
        return ""
    try:
        with open(partial, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= max_header_bytes(ctx.model_args):
                return ""
            names = json.loads(f.read(n).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return ""
    full = _full_weight_tensors(names) if isinstance(names, dict) else []
    return (f"; it holds full-weight tensors ({', '.join(full[:3])[:300]}): modules_to_save is not supported, "
            "save the adapter without it") if full else ""


def _check_alone(ctx: ApiContext, file_name: str, staged: Path, size: int) -> None:
    """What one file can be checked for without the other (AdapterInvalid or ApiError, 5004)."""
    if size == 0:
        raise invalid(f"{file_name} is empty")
    if file_name == CONFIG_FILE:
        check_config_file(staged, ctx.model_args)
        return
    try:
        with open(staged, "rb") as f:
            tensors = check_file(f, max_header_bytes(ctx.model_args))
    except SafetensorsFormatError as e:
        raise invalid(f"adapter_model.safetensors is corrupt: {e}") from None
    if not tensors:
        raise invalid("adapter_model.safetensors holds no tensors")
    if full := _full_weight_tensors(tensors):
        raise invalid(f"adapter_model.safetensors holds full-weight tensors ({', '.join(full[:3])[:300]}): "
                      "modules_to_save is not supported, save the adapter without it")


def _check_pair(ctx: ApiContext, finetune: Finetune, file_name: str, staged: Path) -> None:
    """With the other file already stored: the full validation serving applies (AdapterInvalid)."""
    other = CONFIG_FILE if file_name == WEIGHTS_FILE else WEIGHTS_FILE
    with tempfile.TemporaryDirectory(dir=ctx.upload_dir) as tmp:
        folder = Path(tmp)
        ctx.store.fetch_to(finetune.assets[other].object_key, folder / other)
        shutil.copyfile(staged, folder / file_name)
        load_adapter(folder, ctx.model_args, name=finetune.name, max_rank=ctx.limits.max_lora_rank,
                     max_file_bytes=ctx.limits.max_adapter_bytes)


def record_refusal(ctx: ApiContext, account_id: str, finetune_id: str, file_name: str, error: Exception) -> None:
    """A refusal of the file's content or size marks the finetune invalid (see CONTENT_REFUSALS)."""
    refusal = as_api_error(error)
    if refusal.code in CONTENT_REFUSALS:
        ctx.registry.mark_invalid(account_id, finetune_id, f"{file_name} was refused: {refusal.message}")


def store_asset(ctx: ApiContext, account_id: str, finetune: Finetune, file_name: str, src: BinaryIO) -> Finetune:
    """Validate, store and record one uploaded file of `finetune`; returns the updated finetune.
    Uploads to one finetune are serialized, so the second file is always checked with the first.
    A refusal of the file marks the finetune invalid (`record_refusal`) before it is raised."""
    if finetune.state == "ready":
        raise _immutable(file_name)
    limit = ctx.limits.max_config_bytes if file_name == CONFIG_FILE else ctx.limits.max_adapter_bytes
    try:
        staged, size, sha256 = _stage(ctx, src, file_name, limit)
    except ApiError as e:
        record_refusal(ctx, account_id, finetune.id, file_name, e)
        raise
    try:
        _check_alone(ctx, file_name, staged, size)
        with _held(ctx, f"finetune/{finetune.id}"):
            finetune = ctx.registry.get_finetune(account_id, finetune.id)
            if finetune.state == "ready":
                raise _immutable(file_name)
            if (CONFIG_FILE if file_name == WEIGHTS_FILE else WEIGHTS_FILE) in finetune.assets:
                _check_pair(ctx, finetune, file_name, staged)
            replaced = finetune.assets.get(file_name)
            key = key_for(sha256)
            with _held(ctx, key):
                ctx.store.put_file(staged, rewrite=True)
                try:
                    updated = ctx.registry.add_asset(account_id, finetune.id, file_name, size, sha256, key,
                                                     replace=True)
                except BaseException:  # e.g. the finetune was deleted meanwhile: leave no orphan
                    _delete_if_unused(ctx, key)
                    raise
            if replaced is not None and replaced.object_key != key:
                with _held(ctx, replaced.object_key):
                    _delete_if_unused(ctx, replaced.object_key)
            return updated
    except (ApiError, AdapterInvalid) as e:
        record_refusal(ctx, account_id, finetune.id, file_name, e)
        raise
    finally:
        shutil.rmtree(staged.parent, ignore_errors=True)


def _immutable(file_name: str) -> ApiError:
    return invalid(f"{file_name}: this finetune is ready and its assets are immutable; create another finetune")


def _delete_if_unused(ctx: ApiContext, key: str) -> None:
    """With the key's lock held: delete the object unless a finetune's asset points at it."""
    if not ctx.registry.object_key_in_use(key):
        ctx.store.delete(key)


def delete_unused_objects(ctx: ApiContext, finetune: Finetune) -> None:
    """After `finetune` was deleted from the registry: delete its objects no other finetune uses."""
    for asset in finetune.assets.values():
        with _held(ctx, asset.object_key):
            _delete_if_unused(ctx, asset.object_key)
