"""AdapterResidency: every tier of every adapter of one engine, in one place.

One state machine per registered adapter (names are the engine's, e.g. finetune ids):

    REMOTE ──▶ DOWNLOADING ──▶ ON_DISK/LOADING ──▶ IN_HOST ──▶ COPYING ──▶ IN_SLOT
       ▲            │                  │              │                      │
       └── disk / host eviction ◀──────┴──────────────┘◀── slot eviction ────┘
    DOWNLOADING / LOADING / COPYING ──failure──▶ ERRORED ──(retry_failed_adapter_after_s)──▶ fetched again

- remote → disk → host (the object store, this engine's download folder, parsed tensors in host
  memory) are the tiers of `AdapterCache` (adapters/cache.py): worker threads, one lock.
- host → device slot is the `SlotTable` (adapters/slot_table.py) plus a copy thread here; the
  slot tier is used from the engine thread only.

Eviction policies, side by side:
- device slots: LRU among idle slots (held or loading slots are never evicted); while a request
  waits for a slot and all are held, one held adapter drains (takes no new requests) so nobody starves;
- host memory and local disk: LRU-2 over slot misses, pinned adapters (those with unfinished
  requests) and loads in flight are never evicted (see adapters/cache.py).

Who calls what:
- the engine: `register` / `remove` (the only two verbs of registration), `pin` / `unpin` around
  a request's life, `step` once per engine step (finished copies taken up; typed failures of the
  adapters that waiting requests need), `snapshot` / `stats` for operators and metrics;
- the scheduler: `acquire` / `release` a slot for a running sequence, `want` (starts bringing an
  adapter into a slot) and `set_draining`.

Failures are domain errors (loraplex/errors.py): `AdapterInvalid` (and `AdapterFilesMissing`) for
a folder that cannot be served, `AdapterUnavailable` when the store or a copy failed (retry later).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from loraplex import errors
from loraplex.adapters.cache import CONFIG_FILE, WEIGHTS_FILE, AdapterCache, AdapterState, LocalSource, RemoteSource
from loraplex.adapters.slot_table import SlotTable
from loraplex.adapters.storage import ObjectStore
from loraplex.config import LoraConfig
from loraplex.logs import event
from loraplex.lora.adapter import LoraAdapter
from loraplex.models.hf_config import ModelArgs

log = logging.getLogger(__name__)
Source = LocalSource | RemoteSource


def adapter_identity(source: Source) -> str:
    """What an adapter's cached KV blocks are keyed by: its content, never its name. A store's
    keys are content hashes already; a local folder's two files are hashed (read once, here)."""
    if isinstance(source, RemoteSource):
        return f"store:{source.config_key}:{source.weights_key}"
    digest = hashlib.sha256()
    for file_name in (CONFIG_FILE, WEIGHTS_FILE):
        with open(source.path / file_name, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return f"local:{digest.hexdigest()}"


def request_failure(name: str, error: BaseException) -> errors.LoraplexError:
    """What a request for adapter `name` fails with when its load failed with `error`: the
    adapter's own validation error (its kind kept), or AdapterUnavailable for a store or copy
    failure, whose details (store URL, bucket, keys) go to the log only."""
    if isinstance(error, (errors.AdapterInvalid, errors.FinetuneNotFound)):
        return type(error)(f"LoRA adapter '{name}' could not be loaded: {error.message}")
    return errors.AdapterUnavailable(f"LoRA adapter '{name}' could not be loaded ({type(error).__name__}); retry later")


class AdapterResidency:
    """See the module docstring. Slot methods (`acquire`, `release`, `want`, `set_draining`,
    `step`, `register`, `remove`, `snapshot`) are for the engine thread only; `pin`, `unpin` and
    `stats` are thread-safe."""

    def __init__(self, args: ModelArgs, config: LoraConfig, *, data_dir: Path, store: ObjectStore | None,
                 load_slot: Callable[[int, LoraAdapter], None], bytes_per_slot: int, pin_memory: bool,
                 on_change: Callable[[], None]):
        """load_slot(slot, adapter): the host → device copy (runs on this object's copy thread).
        on_change(): called from worker threads when a load or copy finished or failed."""
        cache_dir, lock = _private_cache_dir(data_dir)
        self.tiers = AdapterCache(args, config, store=store, disk_dir=cache_dir, on_change=lambda name: on_change(),
                                  pin_memory=pin_memory)
        self.slots = SlotTable(config.max_loras)
        self._load_slot, self._bytes_per_slot, self._on_change = load_slot, bytes_per_slot, on_change
        self._identity: dict[str, str] = {}  # registered name → content identity
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="lora-copy")
        self._copies: dict[str, Future] = {}  # copies into slots in flight
        self._copy_failures: dict[str, BaseException] = {}  # reported by the next `step`
        self.slot_loads, self.slot_load_seconds = 0, 0.0  # written by the copy thread only
        self._close = weakref.finalize(self, _close, self.tiers, self._copier, cache_dir, lock)

    def close(self) -> None:
        """Stop the workers and remove the download folder (idempotent; also at collection)."""
        self._close()

    # -- registration ----------------------------------------------------------------------------

    @property
    def names(self):
        """The registered names (a live view)."""
        return self._identity.keys()

    def identity(self, name: str | None) -> str:
        """The content identity of a registered adapter ("" for the base model)."""
        return "" if name is None else self._identity[name]

    def register(self, name: str, source: Source, load_now: bool = False) -> LoraAdapter | None:
        """Make `name` known (replacing a previous registration). A remote adapter is fetched on
        first use, or now with `load_now`, which also validates it (raising AdapterInvalid, …)."""
        if name in self._identity:
            self.remove(name)
        self.tiers.register(name, source)
        self._identity[name] = ""
        try:
            adapter = self.tiers.load_now(name) if load_now else None
            self._identity[name] = adapter_identity(source)
        except Exception:
            self.remove(name)
            raise
        return adapter

    def remove(self, name: str) -> None:
        """Forget `name` in every tier (the caller makes sure no request uses it)."""
        if name not in self._identity:
            raise errors.FinetuneNotFound(f"no LoRA adapter named '{name}' has been added")
        copy = self._copies.pop(name, None)
        if copy is not None:  # a copy into its slot is in flight: let it land, then forget it
            copy.exception()
            self.slots.loaded(name)
        self.slots.remove(name)
        self.tiers.unregister(name)
        del self._identity[name]

    # -- a request's life ------------------------------------------------------------------------

    def pin(self, name: str) -> None:
        """A request for `name` arrived: keep it in host memory until `unpin`, and start its load."""
        self.tiers.pin(name)
        self.tiers.prefetch(name)

    def unpin(self, name: str) -> None:
        self.tiers.unpin(name)

    # -- the scheduler's interface ---------------------------------------------------------------

    def acquire(self, name: str) -> int | None:
        """Hold `name`'s slot for one running sequence; None if it is not in a slot (or draining)."""
        return self.slots.acquire(name)

    def release(self, name: str) -> None:
        self.slots.release(name)

    def want(self, name: str) -> bool:
        """Start bringing `name` into a slot: its load below the slots (if not in host memory
        yet), else a slot reserved and the copy into it. True when it cannot get a slot because
        every slot is held (the scheduler then asks for one to drain)."""
        if self.slots.slot_of(name) is not None:  # copying, or in a slot that is draining
            return name == self.slots.draining
        if self.tiers.state(name) is not AdapterState.IN_HOST and self.tiers.prefetch(name) is not AdapterState.IN_HOST:
            return False  # (state first: the cache counts a hit per request, not per poll)
        slot = self.slots.reserve(name)
        if slot is None:
            return True
        copy = self._copier.submit(self._copy, slot, self.tiers.host_adapter(name))
        copy.add_done_callback(lambda _: self._on_change())
        self._copies[name] = copy
        return False

    def set_draining(self, wanted: bool) -> None:
        """wanted: some request waits for a slot while all are held (see SlotTable.set_draining)."""
        self.slots.set_draining(wanted)

    # -- once per engine step --------------------------------------------------------------------

    def step(self, waited_for: Iterable[str]) -> dict[str, errors.LoraplexError]:
        """Take up finished copies into slots, log slot evictions, and return the failures of the
        adapters in `waited_for` (those waiting requests need): a copy that failed since the last
        step, or a load below the slots that is ERRORED."""
        for name, copy in list(self._copies.items()):
            if not copy.done():
                continue
            del self._copies[name]
            if copy.exception() is None:
                self.slots.loaded(name)
            else:
                log.warning("copying adapter %r into its slot failed: %r", name, copy.exception())
                self.slots.abandon(name)
                self._copy_failures[name] = copy.exception()
        for name, slot in self.slots.evicted:
            event(log, "adapter evicted", adapter=name, tier="slot", slot=slot)
        self.slots.evicted.clear()
        failures = {}
        for name in set(waited_for):
            error = self._copy_failures.get(name)
            if error is None and self.tiers.state(name) is AdapterState.ERRORED:
                error = self.tiers.error(name)
            if error is not None:
                failures[name] = request_failure(name, error)
        self._copy_failures.clear()
        return failures

    # -- reports ---------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        """Every tier at once (engine thread):

        {"slots": {"total", "occupied", "bytes_per_slot", "bytes" (of the occupied ones),
                   "residents": [{"slot", "adapter", "loading", "holders"}]},
         "host": {"bytes", "budget_bytes", "adapters": [{"adapter", "bytes", "pins"}]},
         "disk": {"bytes", "budget_bytes", "adapters": [{"adapter", "bytes"}]},
         "loading": [{"adapter", "state": "downloading" | "loading"}], "waiting_for_room": [names],
         "errored": [names]}
        """
        table = self.slots
        slots = {"total": table.num_slots, "occupied": table.num_occupied, "bytes_per_slot": self._bytes_per_slot,
                 "bytes": self._bytes_per_slot * table.num_occupied, "residents": table.residents()}
        return {"slots": slots, **self.tiers.residency()}

    def stats(self) -> dict:
        """The host/disk tiers' counters and sizes (AdapterCache.stats; any thread)."""
        return self.tiers.stats()

    def _copy(self, slot: int, adapter: LoraAdapter) -> None:
        """On the copy thread: one host → slot copy, timed."""
        start = time.perf_counter()
        self._load_slot(slot, adapter)
        seconds = time.perf_counter() - start
        self.slot_load_seconds += seconds
        self.slot_loads += 1
        event(log, "adapter loaded", adapter=adapter.name, tier="slot", source="host", slot=slot,
              bytes=adapter.size_bytes, seconds=round(seconds, 6))


def _private_cache_dir(data_dir: Path) -> tuple[Path, BinaryIO]:
    """A download folder of this engine's own under the data dir: engines sharing a data dir
    must not delete each other's downloads (the cache removes its folder on close). The engine
    holds an flock on the folder's `.lock` for its lifetime (the returned file); folders whose
    lock nobody holds belonged to an engine that died without cleaning up (SIGKILL, power loss)
    and are removed here, so crashes do not pile up copies of adapters."""
    root = data_dir / "adapter-cache"
    root.mkdir(parents=True, exist_ok=True)
    for lock_path in root.glob("engine-*/.lock"):
        try:
            with open(lock_path, "rb") as held:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if held: its engine is alive
                shutil.rmtree(lock_path.parent, ignore_errors=True)
        except OSError:  # held (BlockingIOError), or removed meanwhile by another engine
            continue
    folder = Path(tempfile.mkdtemp(prefix="engine-", dir=root))
    lock = open(folder / ".lock.new", "wb")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.replace(folder / ".lock.new", folder / ".lock")  # seen by others only once held
    return folder, lock


def _close(tiers: AdapterCache, copier: ThreadPoolExecutor, folder: Path, lock: BinaryIO) -> None:
    copier.shutdown(wait=True)
    tiers.close()
    shutil.rmtree(folder, ignore_errors=True)
    lock.close()
