"""Object storage: both backends against the same cases; S3 against a real rclone S3 server on loopback."""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from s3_server import BUCKET, SECRET_KEY, RcloneS3, s3_env

from loraplex.adapters import storage
from loraplex.adapters.storage import (
    IntegrityError,
    InvalidKey,
    LocalStore,
    ObjectNotFound,
    ObjectStore,
    S3Store,
    StorageError,
    StoreUnavailable,
    open_store,
)

_prefixes = itertools.count()


class Backend:
    """One backend under test: opens stores and knows where an object's bytes lie on disk."""

    def __init__(self, name: str, tmp_path: Path, server: RcloneS3 | None) -> None:
        self.name, self.server = name, server
        if server is None:
            self.url = (tmp_path / "store").as_uri()
            self.disk_root = tmp_path / "store"
        else:
            prefix = f"run{os.getpid()}-{next(_prefixes)}/adapters"
            self.url = f"s3://{BUCKET}/{prefix}"
            self.disk_root = server.root / BUCKET / prefix

    def open(self, **kwargs) -> ObjectStore:
        if self.server is not None:
            kwargs.setdefault("create_bucket", True)
        return open_store(self.url, **kwargs)

    def settle(self) -> None:
        """Let the server's directory cache (1 ms) expire after an edit behind its back."""
        if self.server is not None:
            time.sleep(0.02)

    def object_path(self, key: str) -> Path:
        digest = key.removeprefix("sha256/")
        if self.server is None:
            return self.disk_root / "sha256" / digest[:2] / digest
        return self.disk_root / "sha256" / digest


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path, monkeypatch) -> Backend:
    if request.param == "local":
        return Backend("local", tmp_path, None)
    server = request.getfixturevalue("rclone_s3")
    s3_env(monkeypatch, tmp_path, server)
    return Backend("s3", tmp_path, server)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# -- round trips ----------------------------------------------------------------------------


def test_bytes_round_trip(backend, tmp_path):
    store = backend.open()
    data = b"adapter_config.json says hello"
    info = store.put_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    assert (info.key, info.size, info.sha256) == (f"sha256/{digest}", len(data), digest)
    assert store.exists(info.key)
    assert store.get_bytes(info.key) == data
    dest = tmp_path / "out" / "nested" / "blob"
    assert store.fetch_to(info.key, dest) == info
    assert dest.read_bytes() == data
    assert _leftovers(dest.parent) == []
    assert backend.object_path(info.key).read_bytes() == data  # stored where we expect it


def test_large_file_round_trip_streamed(backend, tmp_path):
    """9 MiB: several 1 MiB chunks, and past boto3's 8 MiB multipart threshold on S3."""
    store = backend.open()
    src = tmp_path / "adapter_model.safetensors"
    payload = os.urandom(9 << 20)
    src.write_bytes(payload)
    info = store.put_file(src)
    assert info.size == len(payload) and info.sha256 == hashlib.sha256(payload).hexdigest()
    dest = tmp_path / "fetched" / "adapter_model.safetensors"
    dest.parent.mkdir()
    dest.write_bytes(b"an older version")  # replaced atomically
    assert store.fetch_to(info.key, dest) == info
    assert dest.stat().st_size == len(payload) and dest.read_bytes() == payload
    assert _leftovers(dest.parent) == []


def test_put_is_idempotent(backend, tmp_path, monkeypatch):
    store = backend.open()
    src = tmp_path / "a.bin"
    src.write_bytes(b"same content" * 1000)
    first = store.put_file(src)
    assert store.put_bytes(src.read_bytes()) == first

    def no_upload(*args, **kwargs):
        raise AssertionError("uploaded an object that is already stored")

    monkeypatch.setattr(store, "_upload", no_upload)
    assert store.put_file(src) == first
    assert store.put_bytes(src.read_bytes()) == first
    assert store.get_bytes(first.key) == src.read_bytes()


def test_exists_and_delete(backend):
    store = backend.open()
    info = store.put_bytes(b"to be deleted")
    other = store.put_bytes(b"to be kept")
    assert store.exists(info.key) and store.exists(other.key)
    store.delete(info.key)
    assert not store.exists(info.key) and store.exists(other.key)
    store.delete(info.key)  # deleting a missing key is not an error
    with pytest.raises(ObjectNotFound):
        store.get_bytes(info.key)


def test_missing_key_is_not_found(backend, tmp_path):
    store = backend.open()
    key = "sha256/" + hashlib.sha256(b"never stored").hexdigest()
    assert not store.exists(key)
    with pytest.raises(ObjectNotFound):
        store.get_bytes(key)
    dest = tmp_path / "dest"
    with pytest.raises(ObjectNotFound):
        store.fetch_to(key, dest)
    assert not dest.exists() and _leftovers(tmp_path) == []


BAD_KEYS = [
    "../x",
    "sha256/XYZ",
    "/etc/passwd",
    "sha256/../../etc/passwd",
    "sha256/" + "A" * 64,  # uppercase hex
    "sha256/" + "a" * 63,
    "sha256/" + "a" * 65,
    "sha256/" + "a" * 64 + "/",
    "sha256/" + "a" * 64 + "\n",
    "/sha256/" + "a" * 64,
    "sha256//" + "a" * 64,
    "md5/" + "a" * 32,
    "",
    None,
    # scoped keys: 1 to 3 lowercase segments before sha256/, nothing that climbs or hides
    "../sha256/" + "a" * 64,
    "./sha256/" + "a" * 64,
    "Training/sha256/" + "a" * 64,
    "a/b/c/d/sha256/" + "a" * 64,
    "a//sha256/" + "a" * 64,
    "-a/sha256/" + "a" * 64,
    "a b/sha256/" + "a" * 64,
]


def test_invalid_keys_are_refused(backend, tmp_path):
    store = backend.open()
    dest = tmp_path / "dest"
    for key in BAD_KEYS:
        for call in (store.get_bytes, store.exists, store.delete, lambda k: store.fetch_to(k, dest)):
            with pytest.raises(InvalidKey) as err:
                call(key)
            assert isinstance(err.value, ValueError) and isinstance(err.value, StorageError)
    assert list(tmp_path.iterdir()) == []


def test_a_scoped_object_is_verified_and_deleted_alone(backend):
    """`<scope>/sha256/<hex>`: the same content under two scopes is two objects, each read
    verified against its hash and deleted without touching the other (training files' objects)."""
    store = backend.open()
    data = b'{"messages": []}\n'
    first = store.put_bytes(data, scope="training-files/file-1")
    second = store.put_bytes(data, scope="training-files/file-2")
    assert first.key == f"training-files/file-1/sha256/{first.sha256}" and first.sha256 == second.sha256
    assert store.get_bytes(first.key) == data and store.exists(second.key)
    store.delete(first.key)
    assert not store.exists(first.key) and store.get_bytes(second.key) == data
    assert not store.exists(f"sha256/{first.sha256}")  # never the shared, unscoped object
    with pytest.raises(InvalidKey):
        store.put_bytes(data, scope="../up")


# -- integrity ------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_object_is_refused(backend, tmp_path, damage):
    store = backend.open()
    data = os.urandom(64 << 10)
    info = store.put_bytes(data)
    path = backend.object_path(info.key)
    if damage == "flip":
        raw = bytearray(path.read_bytes())
        raw[1000] ^= 0xFF
        path.write_bytes(bytes(raw))
    else:
        path.write_bytes(data[: len(data) // 2])
    backend.settle()
    with pytest.raises(IntegrityError):
        store.get_bytes(info.key)
    dest = tmp_path / "dest.safetensors"
    with pytest.raises(IntegrityError):
        store.fetch_to(info.key, dest)
    assert not dest.exists() and _leftovers(tmp_path) == []


def test_swapped_object_is_refused(backend, tmp_path):
    store = backend.open()
    a = store.put_bytes(b"tenant A's adapter weights")
    b = store.put_bytes(b"tenant B's adapter weights, longer")
    shutil.copyfile(backend.object_path(b.key), backend.object_path(a.key))
    backend.settle()
    dest = tmp_path / "dest"
    dest.write_bytes(b"previous good copy")
    with pytest.raises(IntegrityError, match=a.key):
        store.fetch_to(a.key, dest)
    assert dest.read_bytes() == b"previous good copy"  # left untouched
    assert _leftovers(tmp_path) == []
    with pytest.raises(IntegrityError):
        store.get_bytes(a.key)
    assert store.get_bytes(b.key) == b"tenant B's adapter weights, longer"


def test_source_changed_during_upload_is_refused(backend, tmp_path, monkeypatch):
    store = backend.open()
    src = tmp_path / "moving.bin"
    src.write_bytes(b"version 1" * 100)
    real_hash_file = storage._hash_file

    def hash_then_modify(path):
        info = real_hash_file(path)
        Path(path).write_bytes(b"version 2" * 100)
        return info

    monkeypatch.setattr(storage, "_hash_file", hash_then_modify)
    with pytest.raises(IntegrityError, match="changed"):
        store.put_file(src)
    assert not store.exists("sha256/" + hashlib.sha256(b"version 1" * 100).hexdigest())


def test_concurrent_use_from_threads(backend, tmp_path):
    store = backend.open()
    blobs = [bytes([i]) * (100_000 + i) for i in range(4)]

    def work(i: int) -> bytes:
        info = store.put_bytes(blobs[i % 4])  # two threads race on each key
        dest = tmp_path / f"out{i}"
        store.fetch_to(info.key, dest)
        return dest.read_bytes()

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, range(8)))
    assert results == [blobs[i % 4] for i in range(8)]
    assert _leftovers(tmp_path) == []
    stored_dir = backend.object_path(store.put_bytes(blobs[0]).key).parent
    assert not any(p.name.startswith(".") for p in stored_dir.parent.rglob("*"))  # no temp files left


# -- urls and S3 specifics ------------------------------------------------------------------


def test_open_store_urls(tmp_path):
    local = open_store((tmp_path / "a b").as_uri())
    assert isinstance(local, LocalStore) and local.root == tmp_path / "a b"
    assert open_store(str(tmp_path / "plain")).root == tmp_path / "plain"
    s3 = open_store("s3://bucket/some/prefix/", endpoint_url="http://127.0.0.1:9", retries=0)
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")  # nothing contacted
    with pytest.raises(ValueError):
        open_store("ftp://host/x")
    with pytest.raises(ValueError):
        open_store("s3:///no-bucket")


def test_s3_outage_and_recovery(rclone_s3, tmp_path, monkeypatch):
    s3_env(monkeypatch, tmp_path, rclone_s3)
    store = open_store(f"s3://{BUCKET}/outage", retries=2, backoff_s=0.05, create_bucket=True)
    info = store.put_bytes(b"survives the outage")
    calls = []
    real_get = store._client.get_object
    monkeypatch.setattr(store._client, "get_object", lambda **kw: calls.append(kw) or real_get(**kw))
    dest = tmp_path / "dest"
    rclone_s3.stop()
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable) as err:
            store.fetch_to(info.key, dest)
        elapsed = time.monotonic() - t0
        assert len(calls) == 3  # 1 + retries=2
        assert 0.15 <= elapsed < 3.0, elapsed  # backoff 0.05 + 0.1, connection refused is immediate
        assert store.url in str(err.value) and "3 attempts" in str(err.value)
        assert not dest.exists() and _leftovers(tmp_path) == []
        with pytest.raises(StoreUnavailable):
            store.exists(info.key)  # "cannot tell", never a false "absent"
        with pytest.raises(StoreUnavailable):
            store.put_bytes(b"written while down")
    finally:
        rclone_s3.start()
    # The same store object works again: its pooled connections were to the old process.
    assert store.fetch_to(info.key, dest) == info and dest.read_bytes() == b"survives the outage"
    assert store.get_bytes(store.put_bytes(b"written after").key) == b"written after"


def test_s3_refusals_are_not_retried(rclone_s3, tmp_path, monkeypatch):
    s3_env(monkeypatch, tmp_path, rclone_s3)
    key = open_store(f"s3://{BUCKET}/auth", create_bucket=True).put_bytes(b"secret weights").key

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")  # SigV4 signature check fails
    bad = open_store(f"s3://{BUCKET}/auth", retries=3, backoff_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(StorageError) as err:
        bad.get_bytes(key)
    assert not isinstance(err.value, (StoreUnavailable, ObjectNotFound))
    assert time.monotonic() - t0 < 1.0  # no backoff: refused, not transient

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    no_bucket = open_store("s3://no-such-bucket/x", retries=3, backoff_s=1.0)
    with pytest.raises(StorageError) as err:
        no_bucket.get_bytes(key)
    assert not isinstance(err.value, (StoreUnavailable, ObjectNotFound))
    assert not (rclone_s3.root / "no-such-bucket").exists()  # nothing created implicitly
