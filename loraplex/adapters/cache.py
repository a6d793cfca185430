"""The host, disk and remote tiers of the adapter cache: one explicit state machine per adapter.

Device slots live elsewhere (the engine copies an `IN_HOST` adapter into a slot); this class owns
everything below them. Each registered name moves through `AdapterState`:

    REMOTE ──prefetch──▶ DOWNLOADING ──worker──▶ LOADING ──worker──▶ IN_HOST
    ON_DISK ─prefetch──▶ LOADING                  (LocalSource adapters start ON_DISK)
    DOWNLOADING / LOADING ──failure──▶ ERRORED ──prefetch, once retry_failed_adapter_after_s passed──▶ …
    IN_HOST ──host eviction──▶ ON_DISK (its files still there) or REMOTE
    ON_DISK ──disk eviction──▶ REMOTE   (an IN_HOST adapter stays IN_HOST; only its files go)
    LOADING ──its downloaded files gone from disk──▶ DOWNLOADING   (fetched again)

Contracts:

- Threads: every blocking step (store downloads, which verify hashes; reading and parsing the
  safetensors file; deleting folders) runs in a `ThreadPoolExecutor(adapter_workers)`. The public methods
  only do bookkeeping and return at once, except `load_now` (waits for its job; never call it
  from `on_change` or another callback running on a worker) and `close` (waits for the workers).
- Locking: one `threading.Lock` guards the entries, every field of them, the byte totals and the
  counters. It is held for bookkeeping only, never across I/O, parsing, a store call, a wait or
  `on_change`. Workers take it to publish a result.
- Single flight: an adapter has at most one job (download + parse, or parse) in flight; a
  prefetch or load_now that finds one joins it.
- Identity: `register` with a new source replaces the entry object; a worker that finishes for a
  replaced or unregistered entry publishes nothing and deletes what it downloaded.
- Ownership: the cache owns the folders it downloads under `disk_dir` (one fresh folder per
  download); they count against the disk budget and are deleted on disk eviction, on failure, on
  unregister / replacement and on `close`. A `LocalSource` folder belongs to the caller: read,
  never counted, never deleted. `LoraAdapter` objects are immutable: eviction only drops the
  cache's reference, so a slot copy or a running request may keep using one.
- Eviction value is LRU-2 (LRU-K with K=2, O'Neil et al.). A *reference* is one `host_adapter`
  call (the engine calls it when it copies the adapter into a device slot, i.e. once per slot
  miss). Victims are taken in increasing order of (time of the second-to-last reference, time of
  the last reference or arrival in the tier), on a logical clock: anything referenced fewer than
  twice goes before anything referenced twice, oldest first, so a burst of one-off cold adapters
  evicts each other, not a hot one. Both tiers rank by the same history.
- Pins: a pinned adapter (reference count > 0) and its downloaded files are never evicted, and
  neither is anything with a job in flight or the entry being inserted.
- Admission: at most `adapter_workers` jobs are in flight, and a new one starts only while the pinned
  adapters in host memory take less than the host budget (or none is pinned); other prefetches
  wait in a FIFO and start, in request order, as jobs finish and pins are dropped. So requests
  queued for many cold adapters cannot pull them all into memory: the host tier exceeds its
  budget by at most the jobs in flight. A waiting adapter whose last pin is dropped leaves the
  queue (its requests are gone). `load_now` does not wait its turn.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
import shutil
import tempfile
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable

from loraplex import errors
from loraplex.adapters.storage import ObjectStore, validate_key
from loraplex.config import LoraConfig
from loraplex.logs import event
from loraplex.lora.adapter import LoraAdapter, load_adapter
from loraplex.models.hf_config import ModelArgs

log = logging.getLogger(__name__)
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_COUNTERS = ("host_hits", "host_misses", "disk_hits", "disk_misses", "fetches_started", "downloads",
             "objects_fetched", "bytes_fetched", "download_seconds", "loads", "parse_seconds", "errors", "retries",
             "host_evictions", "disk_evictions", "loads_deferred")


class AdapterState(str, Enum):
    REMOTE = "remote"            # known, bytes only in the object store
    DOWNLOADING = "downloading"  # a worker is fetching it to local disk
    ON_DISK = "on_disk"          # files on local disk, not parsed
    LOADING = "loading"          # a worker is parsing/validating it into host memory
    IN_HOST = "in_host"          # parsed LoraAdapter in host memory: ready for a slot
    ERRORED = "errored"          # fetch or validation failed; .error() says why


@dataclass(frozen=True)
class LocalSource:
    """A PEFT folder already on local disk: the disk tier is the folder itself, never deleted."""

    path: Path


@dataclass(frozen=True)
class RemoteSource:
    """The two files of a PEFT folder as content-addressed objects in the store."""

    config_key: str
    weights_key: str


@dataclass(eq=False)
class _Entry:
    name: str
    source: LocalSource | RemoteSource
    state: AdapterState
    folder: Path | None = None  # where the two files are; a LocalSource's own path
    owned: bool = False         # `folder` was downloaded by the cache: counted and deletable
    disk_bytes: int = 0
    adapter: LoraAdapter | None = None
    error: Exception | None = None
    failed_at: float = 0.0
    pins: int = 0
    job: Future | None = None
    refs: deque = field(default_factory=lambda: deque(maxlen=2))  # logical times of the last 2 references
    arrived: int = -1           # logical time it last entered a tier
    deferred: int | None = None  # its ticket while waiting in the cache's FIFO for room to load


def _value(e: _Entry) -> tuple[int, int]:
    """LRU-2 rank; the smallest is evicted first."""
    penultimate = e.refs[0] if len(e.refs) == 2 else -1
    return penultimate, max(e.refs[-1] if e.refs else -1, e.arrived)


def _remove(folders) -> None:
    for folder in folders:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


class AdapterCache:
    """Host / disk / remote tiers for the adapters of one base model (see the module docstring).

    Unknown names raise KeyError everywhere except `unregister` and `unpin`. `stats()` counts hits
    and misses per request for an adapter (`prefetch` / `load_now` that find it IN_HOST, ON_DISK,
    REMOTE), not per poll of `state` or `host_adapter`.
    """

    def __init__(self, args: ModelArgs, config: LoraConfig = LoraConfig(), *, store: ObjectStore | None = None,
                 disk_dir: Path | None = None, on_change: Callable[[str], None] | None = None,
                 pin_memory: bool = False) -> None:
        """config: max_lora_rank, the budgets (adapter_host_cache_bytes, adapter_disk_cache_bytes),
        adapter_workers and retry_failed_adapter_after_s. pin_memory: keep host copies in
        page-locked memory (CUDA engines: async slot copies)."""
        self._args, self._max_rank, self._store = args, config.max_lora_rank, store
        self._pin_memory = pin_memory
        self._own_dir = disk_dir is None and store is not None
        if self._own_dir:  # a temporary folder of our own, removed by close()
            disk_dir = tempfile.mkdtemp(prefix="loraplex-adapters-")
        self._disk_dir = Path(disk_dir) if disk_dir is not None else None
        self._disk_budget, self._host_budget = config.adapter_disk_cache_bytes, config.adapter_host_cache_bytes
        self._retry_after, self._on_change = config.retry_failed_adapter_after_s, on_change
        self._workers, self._in_flight = config.adapter_workers, 0
        self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="adapter-cache")
        self._deferred: deque[tuple[int, _Entry]] = deque()  # (ticket, entry) waiting for room to load
        self._tickets = itertools.count()
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._host_bytes = self._disk_bytes = 0
        self._clock = itertools.count()
        self._folders = itertools.count()
        self._stats: dict[str, float] = dict.fromkeys(_COUNTERS, 0)
        self._evictions: list[tuple[str, str, int]] = []  # (tier, name, bytes), logged by _log_evictions
        self._closed = False

    # -- registration ----------------------------------------------------------------------------

    def register(self, name: str, source: LocalSource | RemoteSource) -> None:
        """Make `name` known. Idempotent for an equal source; another source replaces the entry,
        dropping its cached copies (its pins carry over: they belong to the name's requests)."""
        if isinstance(source, RemoteSource):
            if self._store is None:
                raise ValueError(f"adapter {name!r}: a RemoteSource needs an object store")
            validate_key(source.config_key)
            validate_key(source.weights_key)
            entry = _Entry(name, source, AdapterState.REMOTE)
        elif isinstance(source, LocalSource):
            source = LocalSource(Path(source.path))
            entry = _Entry(name, source, AdapterState.ON_DISK, folder=source.path)
        else:
            raise TypeError(f"adapter {name!r}: source must be a LocalSource or RemoteSource, "
                            f"not {type(source).__name__}")
        with self._lock:
            old = self._entries.get(name)
            if old is not None and old.source == source:
                return
            self._entries[name] = entry
            doomed = []
            if old is not None:
                entry.pins = old.pins
                doomed = self._forget_locked(old)
                self._admit_deferred_locked()
        self._remove_later(doomed)

    def unregister(self, name: str) -> None:
        """Forget `name` and drop its cached copies; unknown names are ignored."""
        with self._lock:
            old = self._entries.pop(name, None)
            doomed = self._forget_locked(old) if old is not None else []
            self._admit_deferred_locked()
        self._remove_later(doomed)

    # -- requests --------------------------------------------------------------------------------

    def prefetch(self, name: str) -> AdapterState:
        """Start whatever brings `name` to IN_HOST (or join the job in flight); returns at once with
        the state after the call. An ERRORED adapter is retried only once `retry_failed_adapter_after_s`
        has passed since its failure."""
        with self._lock:
            e = self._get(name)
            self._start_locked(e, force=False)
            return e.state

    def load_now(self, name: str) -> LoraAdapter:
        """Bring `name` to IN_HOST on a worker and wait for it; retries an ERRORED adapter at once.
        Raises what the job raised (AdapterInvalid, StorageError …). Blocks: not for worker threads."""
        with self._lock:
            e = self._get(name)
            self._start_locked(e, force=True)
            if e.state is AdapterState.IN_HOST:
                return e.adapter
            job = e.job
        return job.result()

    def state(self, name: str) -> AdapterState:
        with self._lock:
            return self._get(name).state

    def error(self, name: str) -> Exception | None:
        """Why the adapter is ERRORED; None in any other state."""
        with self._lock:
            e = self._get(name)
            return e.error if e.state is AdapterState.ERRORED else None

    def host_adapter(self, name: str) -> LoraAdapter | None:
        """The parsed adapter if IN_HOST, else None. A non-None answer is one reference for eviction."""
        with self._lock:
            e = self._get(name)
            if e.state is not AdapterState.IN_HOST:
                return None
            e.refs.append(next(self._clock))
            return e.adapter

    def pin(self, name: str) -> None:
        """Keep `name` (host copy and downloaded files) from eviction until the matching unpin."""
        with self._lock:
            self._get(name).pins += 1

    def unpin(self, name: str) -> None:
        """Drop one pin; the last one lets both tiers shrink back to their budgets. A name
        unregistered meanwhile is ignored (a request may finish after its adapter was removed)."""
        with self._lock:
            e = self._entries.get(name)
            if e is None:
                return
            if e.pins == 0:
                raise ValueError(f"adapter {name!r} is not pinned")
            e.pins -= 1
            if e.pins:
                return
            e.deferred = None  # the requests that wanted it are gone: it leaves the load queue
            self._evict_host_locked(keep=None)
            doomed = self._evict_disk_locked(keep=None)
            self._admit_deferred_locked()
        self._remove_later(doomed)
        self._log_evictions()

    def stats(self) -> dict:
        """Counters (see _COUNTERS), tier sizes in bytes and the number of adapters per state."""
        with self._lock:
            out = dict(self._stats)
            out.update(host_bytes=self._host_bytes, disk_bytes=self._disk_bytes,
                       states=dict(Counter(e.state.value for e in self._entries.values())))
            return out

    def residency(self) -> dict:
        """One consistent view of the tiers: per adapter in host memory or on local disk its bytes
        (and pins), the loads in flight (downloading / parsing) or waiting for room, the errored
        ones; byte totals and budgets per tier."""
        with self._lock:
            entries = sorted(self._entries.values(), key=lambda e: e.name)
            return {
                "host": {"bytes": self._host_bytes, "budget_bytes": self._host_budget,
                         "adapters": [{"adapter": e.name, "bytes": e.adapter.size_bytes, "pins": e.pins}
                                      for e in entries if e.state is AdapterState.IN_HOST]},
                "disk": {"bytes": self._disk_bytes, "budget_bytes": self._disk_budget,
                         "adapters": [{"adapter": e.name, "bytes": e.disk_bytes}
                                      for e in entries if e.owned and e.folder is not None]},
                "loading": [{"adapter": e.name, "state": e.state.value} for e in entries
                            if e.state in (AdapterState.DOWNLOADING, AdapterState.LOADING)],
                "waiting_for_room": [e.name for ticket, e in self._deferred
                                     if e.deferred == ticket and self._is_current(e)],
                "errored": [e.name for e in entries if e.state is AdapterState.ERRORED],
            }

    def close(self) -> None:
        """Stop the workers (jobs not started are cancelled, running ones finish) and delete the
        downloaded folders; they are not reused by a later cache."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            doomed = [self._drop_files_locked(e) for e in self._entries.values()]
        _remove(doomed)
        if self._own_dir:
            shutil.rmtree(self._disk_dir, ignore_errors=True)

    def __enter__(self) -> AdapterCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- bookkeeping (called with the lock held) -------------------------------------------------

    def _get(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"adapter {name!r} is not registered") from None

    def _start_locked(self, e: _Entry, force: bool) -> None:
        """Submit the job that brings `e` to IN_HOST, unless it is there, on its way, ERRORED too
        recently (and not `force`), or has to wait for room (see Admission; not with `force`)."""
        if self._closed:
            raise RuntimeError("AdapterCache is closed")
        if e.state is AdapterState.IN_HOST:
            self._stats["host_hits"] += 1
            return
        if e.state in (AdapterState.DOWNLOADING, AdapterState.LOADING):
            return
        if not force:
            if e.state is AdapterState.ERRORED and time.monotonic() - e.failed_at < self._retry_after:
                return
            if e.deferred is not None:
                return
            if not self._has_room_locked():
                e.deferred = next(self._tickets)
                self._deferred.append((e.deferred, e))
                self._stats["loads_deferred"] += 1
                return
        self._submit_locked(e)

    def _has_room_locked(self) -> bool:
        """A free worker, and pinned host copies under the host budget (unpinned ones make way when
        the new adapter lands)."""
        if self._in_flight >= self._workers:
            return False
        pinned = sum(x.adapter.size_bytes for x in self._entries.values() if x.pins and x.state is AdapterState.IN_HOST)
        return pinned == 0 or pinned < self._host_budget

    def _admit_deferred_locked(self) -> None:
        """Start deferred loads, oldest first, while there is room."""
        while self._deferred and not self._closed and self._has_room_locked():
            ticket, e = self._deferred.popleft()
            if e.deferred != ticket:  # started meanwhile (load_now), dropped, or queued again later
                continue
            e.deferred = None
            if self._is_current(e) and e.state in (AdapterState.REMOTE, AdapterState.ON_DISK, AdapterState.ERRORED):
                self._submit_locked(e)

    def _submit_locked(self, e: _Entry) -> None:
        e.deferred = None
        if e.state is AdapterState.ERRORED:
            self._stats["retries"] += 1
            e.error = None
            e.state = AdapterState.ON_DISK if e.folder is not None else AdapterState.REMOTE
        self._stats["host_misses"] += 1
        if e.state is AdapterState.ON_DISK:
            self._stats["disk_hits"] += 1
            e.state = AdapterState.LOADING
        else:
            self._stats["disk_misses"] += 1
            self._stats["fetches_started"] += 1
            e.state = AdapterState.DOWNLOADING
        self._in_flight += 1
        e.job = self._pool.submit(self._work, e, e.folder if e.state is AdapterState.LOADING else None)

    def _is_current(self, e: _Entry) -> bool:
        return self._entries.get(e.name) is e

    def _drop_files_locked(self, e: _Entry) -> Path | None:
        """Un-count the folder `e` downloaded and return it for deletion (None if it has none)."""
        if not e.owned or e.folder is None:
            return None
        folder, e.folder, e.owned = e.folder, None, False
        self._disk_bytes -= e.disk_bytes
        e.disk_bytes = 0
        return folder

    def _forget_locked(self, e: _Entry) -> list[Path | None]:
        """Drop a replaced or unregistered entry's copies; a job in flight cleans up its own files."""
        if e.state is AdapterState.IN_HOST:
            self._host_bytes -= e.adapter.size_bytes
        e.adapter = None
        return [] if e.job is not None else [self._drop_files_locked(e)]

    def _evict_host_locked(self, keep: _Entry | None) -> None:
        candidates = [e for e in self._entries.values()
                      if e.state is AdapterState.IN_HOST and not e.pins and e is not keep]
        for victim in sorted(candidates, key=_value):
            if self._host_bytes <= self._host_budget:
                break
            self._evictions.append(("host", victim.name, victim.adapter.size_bytes))
            self._host_bytes -= victim.adapter.size_bytes
            victim.adapter = None
            victim.state = AdapterState.ON_DISK if victim.folder is not None else AdapterState.REMOTE
            self._stats["host_evictions"] += 1

    def _evict_disk_locked(self, keep: _Entry | None) -> list[Path | None]:
        candidates = [e for e in self._entries.values()
                      if e.owned and e.folder is not None and not e.pins and e.job is None and e is not keep]
        doomed = []
        for victim in sorted(candidates, key=_value):
            if self._disk_bytes <= self._disk_budget:
                break
            self._evictions.append(("disk", victim.name, victim.disk_bytes))
            doomed.append(self._drop_files_locked(victim))
            if victim.state is AdapterState.ON_DISK:
                victim.state = AdapterState.REMOTE
            self._stats["disk_evictions"] += 1
        return doomed

    def _log_evictions(self) -> None:
        """Log the evictions recorded under the lock, outside it: one line per adapter and tier."""
        with self._lock:
            evictions, self._evictions = self._evictions, []
        for tier, name, size in evictions:
            event(log, "adapter evicted", adapter=name, tier=tier, bytes=size)

    def _remove_later(self, doomed: list[Path | None]) -> None:
        """Delete folders on a worker (inline once the pool is shut down)."""
        doomed = [d for d in doomed if d is not None]
        if not doomed:
            return
        try:
            self._pool.submit(_remove, doomed)
        except RuntimeError:
            _remove(doomed)

    # -- the job (runs on a worker; takes the lock only to publish) ------------------------------

    def _work(self, e: _Entry, folder: Path | None) -> LoraAdapter:
        try:
            if folder is not None and self._lost_download(e, folder):
                folder = None
            if folder is None:
                folder = self._fetch(e)
            return self._parse(e, folder)
        except Exception as exc:
            self._fail(e, exc)
            raise
        finally:
            with self._lock:
                self._in_flight -= 1
                self._admit_deferred_locked()

    def _lost_download(self, e: _Entry, folder: Path) -> bool:
        """Whether `folder`, downloaded by the cache, lost its files (removed under it, e.g. by a
        temp cleaner); then it is forgotten and the job downloads again. A LocalSource folder is
        the caller's: its missing files are an error, left to the parser to report."""
        if all((folder / name).is_file() for name in (CONFIG_FILE, WEIGHTS_FILE)):
            return False
        with self._lock:
            if not (e.owned and e.folder == folder and self._is_current(e)):
                return False  # the parser reports the missing files (a replaced entry publishes nothing)
            self._drop_files_locked(e)
            e.state = AdapterState.DOWNLOADING
            self._stats["fetches_started"] += 1
        log.warning("adapter %r: its downloaded files are gone from %s; downloading again", e.name, folder)
        _remove([folder])
        return True

    def _fetch(self, e: _Entry) -> Path:
        """REMOTE → disk: both objects into a fresh folder (the store verifies their hashes)."""
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", e.name)[:64]
        folder = self._disk_dir / f"{safe}-{next(self._folders)}"
        t0 = time.perf_counter()
        try:
            infos = [self._store.fetch_to(e.source.config_key, folder / CONFIG_FILE),
                     self._store.fetch_to(e.source.weights_key, folder / WEIGHTS_FILE)]
        except BaseException:
            _remove([folder])
            raise
        size = sum(info.size for info in infos)
        with self._lock:
            self._stats["download_seconds"] += time.perf_counter() - t0
            self._stats["downloads"] += 1
            self._stats["objects_fetched"] += len(infos)
            self._stats["bytes_fetched"] += size
            current = self._is_current(e)
            if current:
                e.folder, e.owned, e.disk_bytes = folder, True, size
                e.state, e.arrived = AdapterState.LOADING, next(self._clock)
                self._disk_bytes += size
                doomed = self._evict_disk_locked(keep=e)
        if not current:
            _remove([folder])
            raise errors.FinetuneNotFound(f"adapter {e.name!r} was unregistered or replaced while downloading")
        _remove(doomed)
        event(log, "adapter loaded", adapter=e.name, tier="disk", source="remote", bytes=size,
              seconds=round(time.perf_counter() - t0, 6))
        self._log_evictions()
        return folder

    def _parse(self, e: _Entry, folder: Path) -> LoraAdapter:
        """disk → host: parse and validate (AdapterInvalid on anything unservable)."""
        t0 = time.perf_counter()
        adapter = load_adapter(folder, self._args, name=e.name, max_rank=self._max_rank)
        if self._pin_memory:
            pinned = {key: (a.pin_memory(), b.pin_memory()) for key, (a, b) in adapter.modules.items()}
            adapter = dataclasses.replace(adapter, modules=pinned)
        doomed = None
        with self._lock:
            self._stats["parse_seconds"] += time.perf_counter() - t0
            self._stats["loads"] += 1
            current = self._is_current(e)
            if current:
                e.adapter, e.state, e.job = adapter, AdapterState.IN_HOST, None
                e.arrived = next(self._clock)
                self._host_bytes += adapter.size_bytes
                self._evict_host_locked(keep=e)
            else:
                doomed = self._drop_files_locked(e)
        _remove([doomed])
        if current:
            event(log, "adapter loaded", adapter=e.name, tier="host", source="disk", bytes=adapter.size_bytes,
                  seconds=round(time.perf_counter() - t0, 6))
            self._log_evictions()
            self._notify(e.name)
        return adapter

    def _fail(self, e: _Entry, exc: Exception) -> None:
        """→ ERRORED; downloaded files are deleted (a retry downloads them again)."""
        with self._lock:
            doomed = self._drop_files_locked(e)
            current = self._is_current(e)
            if current:
                e.state, e.error, e.failed_at, e.job = AdapterState.ERRORED, exc, time.monotonic(), None
                self._stats["errors"] += 1
        _remove([doomed])
        if current:
            log.warning("adapter %r failed to load: %s", e.name, exc)
            self._notify(e.name)

    def _notify(self, name: str) -> None:
        if self._on_change is not None:
            try:
                self._on_change(name)
            except Exception:  # noqa: BLE001 - a broken callback must not kill a worker
                log.exception("on_change(%r) raised", name)
