"""Content-addressed object storage for adapter files: a local directory or an S3-compatible store.

Every object lives under its content address, ``sha256/<64 lowercase hex>``, and every read is
verified against that address: content that does not hash to its key is refused
(:class:`IntegrityError`) and never handed to the caller, never left at the destination path.
An object may also be stored under a *scope*, ``<scope>/sha256/<hex>`` (1 to 3 segments of
``[a-z0-9][a-z0-9_-]{0,63}``, e.g. ``training-files/file-<id>``): still verified against its hash,
but owned by one record (a training file), so it is deleted with that record and never shared;
unscoped objects (adapter files) are shared by every record of the same content.

Contracts shared by both backends:

* Keys are validated before any use (an optional scope, then ``sha256/`` + 64 lowercase hex
  digits, nothing else), so no key can name a path outside the store's root or prefix.
* Uploads and downloads are streamed in ``CHUNK_SIZE`` pieces; a file is never read whole into
  memory (``get_bytes`` / ``put_bytes`` hold the one object they were asked for, by definition).
* ``put_*`` is idempotent: the same content gives the same key, and an object already stored with
  the right size is not written again (its content is not re-read: a corrupted object of the right
  size is caught by the next fetch, and repaired by ``delete`` + ``put``). A stored object of the
  wrong size is overwritten. ``put_file(rewrite=True)`` writes in every case (constant work).
* ``fetch_to`` writes a temporary file next to ``dest``, verifies it, fsyncs it and renames it into
  place atomically; on any failure the temporary file is removed and ``dest`` is left untouched.
* Thread-safety: one store object may be used by several worker threads at once. Stores hold no
  mutable state after construction; temporary names are unique (``tempfile.mkstemp``) and the
  final step of every write is an atomic rename (local) or a single PUT / multipart completion
  (S3). boto3 clients are thread-safe.
* All methods block: call them from worker threads, never inside ``async def``.
* Errors: :class:`ObjectNotFound` (no retry), :class:`IntegrityError` (no retry),
  :class:`InvalidKey`, :class:`StoreUnavailable` (transient failures persisted through every
  retry), :class:`StorageError` for anything else the store refused (e.g. bad credentials).
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import tempfile
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, TypeVar
from urllib.parse import unquote, urlparse

CHUNK_SIZE = 1 << 20
_SCOPE_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}(?:/[a-z0-9][a-z0-9_-]{0,63}){0,2}")
_KEY_RE = re.compile(r"(?:" + _SCOPE_RE.pattern + r"/)?sha256/[0-9a-f]{64}")
_T = TypeVar("_T")


class StorageError(Exception):
    """Base class of every error raised by an object store."""


class InvalidKey(StorageError, ValueError):
    """The key is not ``sha256/<64 lowercase hex>``; it was refused before touching the store."""


class ObjectNotFound(StorageError):
    """No object is stored under the key."""


class IntegrityError(StorageError):
    """Content does not hash to its key (or has the wrong size): refused, never served."""


class StoreUnavailable(StorageError):
    """The store could not be reached, after every retry; the message names the url and last error."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # "sha256/<hex>" (content address)
    size: int
    sha256: str


def validate_key(key: object) -> str:
    """Return ``key`` if it is a well-formed content address, else raise :class:`InvalidKey`."""
    if not isinstance(key, str) or _KEY_RE.fullmatch(key) is None:
        raise InvalidKey(f"invalid object key {key!r}: expected 'sha256/' + 64 lowercase hex digits")
    return key


def key_for(sha256_hex: str, scope: str | None = None) -> str:
    """The key of content hashing to `sha256_hex`: ``sha256/<hex>``, or ``<scope>/sha256/<hex>``."""
    if scope is not None and not (isinstance(scope, str) and _SCOPE_RE.fullmatch(scope)):
        raise InvalidKey(f"invalid object key scope {scope!r}")
    return validate_key(f"{scope}/sha256/{sha256_hex}" if scope else f"sha256/{sha256_hex}")


class _HashingReader:
    """Read-only, non-seekable view of a binary stream that hashes and counts what is read."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._hash.update(data)
        self.size += len(data)
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class _HashingSink:
    """Write end of a download: hashes and counts, and can start over when a download is retried."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.reset()

    def reset(self) -> None:
        self._raw.seek(0)
        self._raw.truncate()
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self._raw.write(data)
        self._hash.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _hash_file(path: Path) -> ObjectInfo:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            h.update(chunk)
            size += len(chunk)
    digest = h.hexdigest()
    return ObjectInfo(key_for(digest), size, digest)


def _verify(key: str, size: int, digest: str, declared_size: int | None, where: str) -> ObjectInfo:
    if declared_size is not None and size != declared_size:
        raise IntegrityError(f"{where}: {key}: got {size} bytes, the store declared {declared_size}")
    if not key.endswith(f"sha256/{digest}"):  # a valid key ends with exactly its content address
        raise IntegrityError(f"{where}: {key}: content hashes to sha256/{digest}")
    return ObjectInfo(key, size, digest)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def _atomic_file(dest: Path, mode: str) -> Iterator[BinaryIO]:
    """A temporary file next to `dest`; if the block succeeds it is fsynced and renamed over
    `dest` (then the folder is fsynced), otherwise deleted. Readers never see a partial file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)


class ObjectStore(ABC):
    """A content-addressed blob store; see the module docstring for the shared contracts.

    Subclasses implement four primitives on already-validated keys (``_size``, ``_upload``,
    ``_download``, ``_delete``); hashing, verification, idempotency and atomic placement of
    downloads live here, once.
    """

    url: str

    # -- public interface -------------------------------------------------------------------

    def put_file(self, path: Path, *, rewrite: bool = False) -> ObjectInfo:
        """Store the file's content; streamed, hashed first, not re-uploaded if already stored
        unless `rewrite` (then it is written whatever is stored: the same work, and time, whether
        or not someone stored these bytes before — tenants' uploads use it, see api/uploads.py).

        The file is read twice (hash, then upload) and the upload is hashed again: if the file
        changed in between, the upload is refused with :class:`IntegrityError`.
        """
        path = Path(path)
        info = _hash_file(path)
        return self._put(info, lambda: open(path, "rb"), rewrite)

    def put_bytes(self, data: bytes, scope: str | None = None) -> ObjectInfo:
        """Store ``data`` (under ``scope``, see the module docstring); not re-uploaded if already stored."""
        data = bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        info = ObjectInfo(key_for(digest, scope), len(data), digest)
        return self._put(info, lambda: io.BytesIO(data))

    def fetch_to(self, key: str, dest: Path) -> ObjectInfo:
        """Download ``key`` to ``dest`` (parents created): temp file next to it, verify, fsync, rename.

        On a missing object, a mismatch or any error the temp file is removed and ``dest`` is not
        created (an existing ``dest`` is left as it was).
        """
        validate_key(key)
        with _atomic_file(Path(dest), "w+b") as f:
            sink = _HashingSink(f)
            declared = self._download(key, sink)
            return _verify(key, sink.size, sink.hexdigest(), declared, self.url)

    def get_bytes(self, key: str) -> bytes:
        """The content of ``key``, verified against the key before it is returned."""
        validate_key(key)
        buf = io.BytesIO()
        sink = _HashingSink(buf)
        declared = self._download(key, sink)
        _verify(key, sink.size, sink.hexdigest(), declared, self.url)
        return buf.getvalue()

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key`` (its content is not verified here)."""
        return self._size(validate_key(key)) is not None

    def delete(self, key: str) -> None:
        """Remove the object if present; deleting a missing key is not an error."""
        self._delete(validate_key(key))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # -- backend primitives -----------------------------------------------------------------

    def _put(self, info: ObjectInfo, open_source: Callable[[], BinaryIO], rewrite: bool = False) -> ObjectInfo:
        if not rewrite and self._size(info.key) == info.size:
            return info
        self._upload(info, open_source)
        return info

    @abstractmethod
    def _size(self, key: str) -> int | None:
        """Stored size of ``key``, or None when absent."""

    @abstractmethod
    def _upload(self, info: ObjectInfo, open_source: Callable[[], BinaryIO]) -> None:
        """Store the stream from ``open_source()`` under ``info.key``; it must hash to ``info``.

        May call ``open_source`` once per attempt; closes what it opens.
        """

    @abstractmethod
    def _download(self, key: str, sink: _HashingSink) -> int | None:
        """Stream the object into ``sink`` (``sink.reset()`` before a retry); return its declared size."""

    @abstractmethod
    def _delete(self, key: str) -> None:
        """Remove ``key`` if present."""


def _check_upload(reader: _HashingReader, info: ObjectInfo, where: str) -> None:
    if reader.size != info.size or reader.hexdigest() != info.sha256:
        raise IntegrityError(
            f"{where}: source changed while uploading {info.key} "
            f"(read {reader.size} bytes hashing to {reader.hexdigest()})"
        )


class LocalStore(ObjectStore):
    """Objects under ``<root>/[<scope>/]sha256/<first 2 hex>/<hex>``; written via temp file + fsync + rename.

    The root and fan-out directories are created on first write. No retries: local file system
    errors surface as ``OSError``.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        scope, _, digest = key.rpartition("sha256/")
        return self.root / scope / "sha256" / digest[:2] / digest

    def _size(self, key: str) -> int | None:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            return None
        return st.st_size

    def _upload(self, info: ObjectInfo, open_source: Callable[[], BinaryIO]) -> None:
        with _atomic_file(self._path(info.key), "wb") as out, open_source() as src:
            reader = _HashingReader(src)
            while chunk := reader.read(CHUNK_SIZE):
                out.write(chunk)
            _check_upload(reader, info, self.url)

    def _download(self, key: str, sink: _HashingSink) -> int | None:
        try:
            f = open(self._path(key), "rb")
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.url}: no object {key}") from None
        with f:
            declared = os.fstat(f.fileno()).st_size
            while chunk := f.read(CHUNK_SIZE):
                sink.write(chunk)
        return declared

    def _delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        scope = key.rpartition("sha256/")[0].strip("/")
        if "/" in scope:  # a record's own folders (below the scope's first segment) go with it
            top = self.root / scope.split("/")[0]
            for parent in path.parents:
                if parent == top:
                    break
                try:
                    parent.rmdir()
                except OSError:  # not empty, or gone
                    break


# -- S3 -------------------------------------------------------------------------------------

_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "RequestLimitExceeded",
    "TooManyRequestsException", "RequestTimeout", "InternalError", "ServiceUnavailable",
})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


def _classify(exc: BaseException) -> str:
    """'transient' (retry), 'not_found', or 'other' for an exception raised by boto3."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, IncompleteReadError
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if code in _NOT_FOUND_CODES:
            return "not_found"
        if code in _TRANSIENT_CODES or status >= 500 or status in (408, 429):
            return "transient"
        return "other"
    transient = (ConnectionError, HTTPClientError, IncompleteReadError, Urllib3Error,
                 ConnectionResetError, ConnectionAbortedError, BrokenPipeError, TimeoutError)
    return "transient" if isinstance(exc, transient) else "other"


class S3Store(ObjectStore):
    """Objects at ``s3://<bucket>/<prefix>/sha256/<hex>`` on an S3-compatible server.

    Path-style addressing, SigV4, botocore retries off (this class retries transient failures
    itself: ``retries`` more attempts with exponential backoff ``backoff_s * 2**i`` plus up to 10%
    jitter, then :class:`StoreUnavailable`). Short timeouts (2 s connect, 10 s read). Nothing is
    contacted at construction unless ``create_bucket=True``, which creates a missing bucket.
    Uploads go through ``upload_fileobj`` (multipart past 8 MiB, one part in memory at a time,
    no extra threads); downloads stream ``get_object``'s body in ``CHUNK_SIZE`` pieces.
    """

    def __init__(
        self,
        url: str,
        bucket: str,
        prefix: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        retries: int = 3,
        backoff_s: float = 0.2,
        create_bucket: bool = False,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if retries < 0 or backoff_s < 0:
            raise ValueError("retries and backoff_s must be >= 0")
        self.url = url
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.retries = retries
        self.backoff_s = backoff_s
        env = os.environ.get
        endpoint_url = endpoint_url or env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL") or None
        region = region or env("AWS_REGION") or env("AWS_DEFAULT_REGION") or "us-east-1"
        config = Config(
            region_name=region,
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            connect_timeout=2,
            read_timeout=10,
            retries={"total_max_attempts": 1},
            max_pool_connections=32,
            # Only checksum when an operation requires it: S3-compatible servers vary in their
            # support for the newer flexible checksums; we verify sha256 ourselves anyway.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # A session of our own: the default session is shared, mutable and not thread-safe.
        self._client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
        self._transfer = TransferConfig(use_threads=False, multipart_chunksize=8 << 20)
        if create_bucket:
            self._ensure_bucket()

    def _name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _retry(self, what: str, fn: Callable[[], _T]) -> _T:
        attempts = self.retries + 1
        for i in range(attempts):
            try:
                return fn()
            except StorageError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                kind = _classify(exc)
                if kind == "not_found":
                    raise ObjectNotFound(f"{self.url}: {what}: not found") from exc
                if kind == "other":
                    raise StorageError(f"{self.url}: {what} failed: {exc}") from exc
                if i + 1 == attempts:
                    raise StoreUnavailable(
                        f"{self.url}: {what} failed after {attempts} attempts: {exc!r}"
                    ) from exc
                time.sleep(self.backoff_s * (2**i) * random.uniform(1.0, 1.1))
        raise AssertionError("unreachable")

    def _ensure_bucket(self) -> None:
        def attempt() -> None:
            from botocore.exceptions import ClientError

            try:
                self._client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if _classify(exc) != "not_found":
                    raise
                self._client.create_bucket(Bucket=self.bucket)

        self._retry(f"create bucket {self.bucket}", attempt)

    def _size(self, key: str) -> int | None:
        def attempt() -> int | None:
            from botocore.exceptions import ClientError

            try:
                head = self._client.head_object(Bucket=self.bucket, Key=self._name(key))
            except ClientError as exc:
                if _classify(exc) == "not_found":
                    return None
                raise
            return int(head["ContentLength"])

        return self._retry(f"head {key}", attempt)

    def _upload(self, info: ObjectInfo, open_source: Callable[[], BinaryIO]) -> None:
        name = self._name(info.key)

        def attempt() -> _HashingReader:
            with open_source() as src:
                reader = _HashingReader(src)
                self._client.upload_fileobj(reader, self.bucket, name, Config=self._transfer)
            return reader

        reader = self._retry(f"put {info.key}", attempt)
        # The source changed between hashing and upload: what we wrote is not this key's content.
        # (Deleting it races with a concurrent correct upload of the same key, which is then lost;
        # the next put of that content writes it again.)
        try:
            _check_upload(reader, info, self.url)
        except IntegrityError:
            self._retry(f"delete {info.key}", lambda: self._client.delete_object(Bucket=self.bucket, Key=name))
            raise

    def _download(self, key: str, sink: _HashingSink) -> int | None:
        def attempt() -> int:
            sink.reset()
            resp = self._client.get_object(Bucket=self.bucket, Key=self._name(key))
            body = resp["Body"]
            try:
                for chunk in body.iter_chunks(CHUNK_SIZE):
                    sink.write(chunk)
            finally:
                body.close()
            return int(resp["ContentLength"])

        return self._retry(f"get {key}", attempt)

    def _delete(self, key: str) -> None:
        self._retry(f"delete {key}", lambda: self._client.delete_object(Bucket=self.bucket, Key=self._name(key)))


def open_store(
    url: str,
    *,
    retries: int = 3,
    backoff_s: float = 0.2,
    create_bucket: bool = False,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> ObjectStore:
    """Open a store by url.

    * ``file:///abs/path`` or a plain path: :class:`LocalStore` (``retries``/``backoff_s`` unused).
    * ``s3://bucket/prefix``: :class:`S3Store`. Endpoint from ``endpoint_url``, else
      ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL`` (else AWS itself); credentials from the
      standard boto3 chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` ...); region from
      ``region``, ``AWS_REGION``, ``AWS_DEFAULT_REGION``, else ``us-east-1``. The bucket is created
      only when missing and ``create_bucket=True``.
    """
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"s3 url without a bucket: {url!r}")
        return S3Store(
            url, parsed.netloc, unquote(parsed.path), endpoint_url=endpoint_url, region=region,
            retries=retries, backoff_s=backoff_s, create_bucket=create_bucket,
        )
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file url with a remote host: {url!r}")
        return LocalStore(Path(unquote(parsed.path)))
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive, i.e. a plain path
        raise ValueError(f"unsupported store url {url!r}: use file://, s3:// or a path")
    return LocalStore(Path(url))
