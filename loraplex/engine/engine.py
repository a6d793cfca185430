"""LLMEngine: add requests, step, abort. Single-threaded: the caller owns the loop (the adapter
cache's worker threads load adapters meanwhile)."""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import logging
import os
import shutil
import time
import tempfile
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, NamedTuple

import torch

from loraplex import env
from loraplex.config import EngineConfig
from loraplex.core import RequestOutput, SamplingParams
from loraplex.engine.decode_graphs import GRAPH_SAFE_DECODE_BACKENDS
from loraplex.engine.model_runner import ModelRunner
from loraplex.engine.scheduler import Scheduler
from loraplex.engine.sequence import Sequence
from loraplex.kvcache.block_manager import BlockManager
from loraplex.adapters.cache import CONFIG_FILE, WEIGHTS_FILE, AdapterCache, AdapterState, LocalSource, RemoteSource
from loraplex.adapters.storage import ObjectStore, open_store
from loraplex.lora.adapter import AdapterError, LoraAdapter
from loraplex.logs import event
from loraplex.lora.slot_table import SlotTable
from loraplex.models.loader import load_model
from loraplex.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)


class EngineStats(NamedTuple):
    """A snapshot of the engine's queues and resources (for metrics)."""

    waiting: int
    running: int
    kv_blocks_total: int
    kv_blocks_free: int
    lora_slots_total: int
    lora_slots_occupied: int
    slot_loads: int  # host → slot copies finished so far
    slot_load_seconds: float  # their total duration
    preemptions: int = 0  # sequences preempted so far for want of KV blocks (recomputed later)
    prefix_queried_tokens: int = 0  # prompt tokens of admitted requests looked up in the prefix cache
    prefix_hit_tokens: int = 0  # of which found cached (not computed again)
    prefix_evictions: int = 0  # cached KV blocks reused for other tokens


def resolve_model_dir(model: str, data_dir: Path) -> Path:
    """"default" → the embedded SmolLM2-135M-Instruct, converted once into the data dir."""
    if model == "default":
        from loraplex.models.default_model import ensure_default_model

        return ensure_default_model(data_dir)
    return Path(model)


def _private_cache_dir(data_dir: Path) -> tuple[Path, BinaryIO]:
    """A disk-cache folder of this engine's own under the data dir: engines sharing a data dir
    must not delete each other's downloads (the cache removes its folder on close). The engine
    holds an flock on the folder's `.lock` for its lifetime (the returned file); folders whose
    lock nobody holds belonged to an engine that died without cleaning up (SIGKILL, power loss)
    and are removed here, so crashes do not pile up copies of adapters."""
    root = data_dir / "adapter-cache"
    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_cache_dirs(root)
    folder = Path(tempfile.mkdtemp(prefix="engine-", dir=root))
    lock = open(folder / ".lock.new", "wb")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.replace(folder / ".lock.new", folder / ".lock")  # seen by others only once held
    return folder, lock


def _remove_abandoned_cache_dirs(root: Path) -> None:
    for lock_path in root.glob("engine-*/.lock"):
        try:
            with open(lock_path, "rb") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if held: its engine is alive
                shutil.rmtree(lock_path.parent, ignore_errors=True)
        except OSError:  # held (BlockingIOError), or removed meanwhile by another engine
            continue


def _close_cache(cache: AdapterCache, folder: Path, lock: BinaryIO) -> None:
    cache.close()
    shutil.rmtree(folder, ignore_errors=True)
    lock.close()


def adapter_identity(source: LocalSource | RemoteSource) -> str:
    """What an adapter's cached KV blocks are keyed by: its content, never its name. A store's
    keys are content hashes already; a local folder's two files are hashed (read once, here)."""
    if isinstance(source, RemoteSource):
        return f"store:{source.config_key}:{source.weights_key}"
    digest = hashlib.sha256()
    for file_name in (CONFIG_FILE, WEIGHTS_FILE):
        with open(source.path / file_name, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return f"local:{digest.hexdigest()}"


MAX_GRAPH_BATCH = 256  # decode steps of more sequences run eagerly (their launch cost is amortised anyway)


class LLMEngine:
    def __init__(self, config: EngineConfig, adapter_store: ObjectStore | None = None):
        """adapter_store: where remote adapters live; default: opened from lora.storage_url."""
        self.config = config
        data_dir = Path(config.data_dir) if config.data_dir else env.data_dir()
        model_dir = resolve_model_dir(config.model.model, data_dir)
        model, self.model_args, self.dtype, self.device = load_model(model_dir, config.model.dtype, config.model.device)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        limit = self.model_args.max_position_embeddings
        self.max_model_len = min(config.model.max_model_len or limit, limit)
        self.runner = ModelRunner(model, self.model_args, self.dtype, self.device, config.cache, config.lora)
        self.block_manager = BlockManager(self.runner.num_blocks, config.cache.block_size, config.cache.prefix_caching)
        if config.model.cuda_graphs and self.device.type == "cuda" and self.runner.decode_backend in GRAPH_SAFE_DECODE_BACKENDS:
            self.runner.enable_decode_graphs(min(config.scheduler.max_num_seqs, MAX_GRAPH_BATCH), self.max_model_len)
        lora = config.lora
        cache_dir, cache_lock = _private_cache_dir(data_dir)
        self._wakeup = threading.Event()  # set by the cache's workers when an adapter is ready or failed
        self.adapter_cache = AdapterCache(
            self.model_args,
            max_rank=lora.max_lora_rank,
            store=adapter_store or (open_store(lora.storage_url) if lora.storage_url else None),
            disk_dir=cache_dir,
            disk_budget_bytes=lora.disk_cache_bytes,
            host_budget_bytes=lora.host_cache_bytes,
            on_change=lambda name: self._wakeup.set(),
            pin_memory=self.device.type == "cuda",
            retry_errored_after_s=lora.retry_failed_after_s,
            workers=lora.cache_workers,
        )
        self._close_cache = weakref.finalize(self, _close_cache, self.adapter_cache, cache_dir, cache_lock)
        self.lora_names: set[str] = set()
        self._adapter_identity: dict[str, str] = {}  # name → content identity (prefix-cache salt)
        # host→slot copies run on this thread, off the engine step; finished ones are taken
        # up by the engine thread at the start of the next step
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="lora-copy")
        self._copies: dict[str, Future] = {}
        self._copy_errors: dict[str, BaseException] = {}
        self._slot_loads = [0, 0.0]  # count, seconds; written by the copy thread only
        self.scheduler = Scheduler(config.scheduler, self.block_manager, SlotTable(lora.max_loras), self._adapter_ready)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(self.model_args.eos_token_ids)
        self._sequences: dict[str, Sequence] = {}
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._arrivals = itertools.count()

    def close(self) -> None:
        """Stop the adapter cache's workers and remove this engine's download folder (idempotent;
        also done when the engine is collected or the interpreter exits). The engine cannot load
        adapters afterwards."""
        self._close_cache()

    def add_lora(self, name: str, path: str | Path) -> LoraAdapter:
        """Validate a local PEFT folder now (AdapterError if it cannot be served) and register it."""
        return self.register_lora(name, LocalSource(Path(path)), load_now=True)

    def register_lora(self, name: str, source: LocalSource | RemoteSource, load_now: bool = False) -> LoraAdapter | None:
        """Make an adapter known under `name`. A remote one is fetched on first use (or now, with
        load_now); requests for it wait, without blocking others, until it is in host memory."""
        if name in self.lora_names:
            self.remove_lora(name)
        self.adapter_cache.register(name, source)
        self.lora_names.add(name)
        try:
            adapter = self.adapter_cache.load_now(name) if load_now else None  # validates a local folder
            self._adapter_identity[name] = adapter_identity(source)
        except Exception:
            self.remove_lora(name)
            raise
        return adapter

    def remove_lora(self, name: str) -> None:
        if name not in self.lora_names:
            raise ValueError(f"no LoRA adapter named '{name}' has been added")
        if self.lora_in_use(name):
            raise ValueError(f"LoRA adapter '{name}' is in use by unfinished requests")
        copy = self._copies.pop(name, None)
        if copy is not None:  # a copy into its slot is in flight: let it land, then forget it
            copy.exception()
            self.scheduler.slot_table.loaded(name)
        self.scheduler.slot_table.evict(name)
        self.adapter_cache.unregister(name)
        self.lora_names.discard(name)
        self._adapter_identity.pop(name, None)

    def lora_in_use(self, name: str) -> bool:
        """Whether unfinished requests use adapter `name`."""
        return any(seq.lora == name for seq in self._sequences.values())

    def _adapter_ready(self, name: str) -> bool:
        if self.adapter_cache.state(name) is AdapterState.IN_HOST:
            return True  # (not a prefetch: the cache counts hits per request, not per poll)
        return self.adapter_cache.prefetch(name) is AdapterState.IN_HOST

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, lora: str | None = None,
        cache_salt: str = "",
    ) -> None:
        """Queue a request; raises ValueError for one that can never run (nothing is queued then).
        cache_salt: its cached prompt prefix is shared only with requests of the same salt (and
        adapter content); the API gives each account its own."""
        if request_id in self._sequences:
            raise ValueError(f"request id '{request_id}' is already in use")
        if lora is not None and lora not in self.lora_names:
            raise ValueError(f"no LoRA adapter named '{lora}' has been added")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_args.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_token_ids)} tokens; the context window is {self.max_model_len}"
            )
        longest = min(len(prompt_token_ids) + params.max_tokens, self.max_model_len)
        if self.block_manager.blocks_for(longest) > self.block_manager.num_blocks:
            raise ValueError(
                f"a sequence of {longest} tokens does not fit in the KV cache "
                f"({self.block_manager.num_blocks} blocks of {self.block_manager.block_size})"
            )
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        seq = Sequence(request_id, list(prompt_token_ids), params, next(self._arrivals), generator, lora)
        seq.cache_salt = f"{self._adapter_identity.get(lora, '')}\0{cache_salt}".encode()
        self._sequences[request_id] = seq
        self._detokenizers[request_id] = IncrementalDetokenizer(self.tokenizer)
        if lora is not None:
            self.adapter_cache.pin(lora)  # kept in host memory until this request is done
            self.adapter_cache.prefetch(lora)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final state, or None if unknown."""
        seq = self._sequences.get(request_id)
        if seq is None:
            return None
        seq.finish_reason = "abort"
        self._finish(seq)
        return seq.to_output()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one forward pass; returns the requests that got a new token or failed (finished
        ones included). With nothing runnable (all waiting on adapter loads) it waits briefly for
        a load to finish instead of spinning."""
        self._collect_finished_copies()
        failed = self._fail_requests_of_errored_adapters()
        plan = self.scheduler.schedule()
        slot_table = self.scheduler.slot_table
        for evicted, slot in slot_table.evicted:
            event(log, "adapter evicted", adapter=evicted, tier="slot", slot=slot)
        slot_table.evicted.clear()
        for slot, name in plan.lora_loads:
            copy = self._copier.submit(self._load_slot, slot, self.adapter_cache.host_adapter(name))
            copy.add_done_callback(lambda _: self._wakeup.set())
            self._copies[name] = copy
        if plan.is_empty:
            if not failed:
                self._wakeup.wait(0.05)
            self._wakeup.clear()
            return failed
        result = self.runner.execute(plan.scheduled)
        for entry in plan.scheduled:
            entry.seq.num_computed_tokens += entry.num_tokens
            self.block_manager.cache_computed_blocks(entry.seq, entry.num_tokens)
        outputs = failed
        top_logprobs = result.top_logprobs or [None] * len(result.sampled)
        for entry, token_id, logprob, top in zip(result.sampled, result.token_ids, result.logprobs, top_logprobs):
            seq = entry.seq
            seq.output_token_ids.append(token_id)
            if seq.params.logprobs:
                seq.output_logprobs.append(logprob)
            if seq.params.top_logprobs:
                seq.output_top_logprobs.append(top)
            self._update_text_and_finish(seq, token_id)
            outputs.append(seq.to_output())
        return outputs

    def stats(self) -> EngineStats:
        """Engine-thread only (reads the scheduler's queues)."""
        slots = self.scheduler.slot_table
        return EngineStats(
            waiting=len(self.scheduler.waiting),
            running=len(self.scheduler.running),
            kv_blocks_total=self.block_manager.num_blocks,
            kv_blocks_free=self.block_manager.num_free_blocks,
            lora_slots_total=slots.num_slots,
            lora_slots_occupied=slots.num_occupied,
            slot_loads=self._slot_loads[0],
            slot_load_seconds=self._slot_loads[1],
            preemptions=self.scheduler.num_preemptions,
            prefix_queried_tokens=self.block_manager.prefix_queried_tokens,
            prefix_hit_tokens=self.block_manager.prefix_hit_tokens,
            prefix_evictions=self.block_manager.prefix_evictions,
        )

    def _load_slot(self, slot: int, adapter: LoraAdapter) -> None:
        """On the copy thread: one host → slot copy, timed."""
        start = time.perf_counter()
        self.runner.load_lora(slot, adapter)
        seconds = time.perf_counter() - start
        self._slot_loads[1] += seconds
        self._slot_loads[0] += 1
        event(log, "adapter loaded", adapter=adapter.name, tier="slot", source="host", slot=slot,
              bytes=adapter.size_bytes, seconds=round(seconds, 6))

    def _update_text_and_finish(self, seq: Sequence, token_id: int) -> None:
        detokenizer = self._detokenizers[seq.request_id]
        previous_len = len(seq.text)
        seq.text += detokenizer.add(token_id)
        params = seq.params
        if (token_id in self.eos_token_ids and not params.ignore_eos) or token_id in params.stop_token_ids:
            seq.finish_reason = "stop"
            seq.ends_with_stop_token = True
        elif len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            seq.text += detokenizer.flush()
        if params.stop:  # only the tail that the new text can complete a stop string in
            search_from = max(0, previous_len - params.longest_stop + 1)
            hits = [i for i in (seq.text.find(s, search_from) for s in params.stop) if i >= 0]
            if hits:
                seq.text = seq.text[: min(hits)]
                seq.finish_reason = "stop"
        if seq.finish_reason is not None:
            self._finish(seq)

    def _collect_finished_copies(self) -> None:
        for name, copy in list(self._copies.items()):
            if not copy.done():
                continue
            del self._copies[name]
            if copy.exception() is None:
                self.scheduler.slot_table.loaded(name)
            else:
                log.warning("copying adapter %r into its slot failed: %r", name, copy.exception())
                self.scheduler.slot_table.abandon(name)
                self._copy_errors[name] = copy.exception()

    def _fail_requests_of_errored_adapters(self) -> list[RequestOutput]:
        """Waiting requests whose adapter failed to load (into host memory, or into a slot) end
        now, with the reason; everyone else goes on."""
        failed = []
        for seq in list(self.scheduler.waiting):
            if seq.lora is None:
                continue
            error = self._copy_errors.get(seq.lora)
            if error is None and self.adapter_cache.state(seq.lora) is AdapterState.ERRORED:
                error = self.adapter_cache.error(seq.lora)
            if error is None:
                continue
            seq.finish_reason = "error"
            # adapter validation → its own code (5004, 3039…) and message; a store or copy failure
            # → 3040, "temporarily out of capacity": the same request may succeed later. Its
            # details (store URL, bucket, object keys) go to the log only, never to the tenant.
            if isinstance(error, AdapterError):
                seq.error, seq.error_code = f"LoRA adapter '{seq.lora}' could not be loaded: {error}", error.code
            else:
                seq.error = f"LoRA adapter '{seq.lora}' could not be loaded ({type(error).__name__}); retry later"
                seq.error_code = 3040
            self._finish(seq)
            failed.append(seq.to_output())
        self._copy_errors.clear()
        return failed

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        if seq.lora is not None:
            self.adapter_cache.unpin(seq.lora)
        del self._sequences[seq.request_id]
        del self._detokenizers[seq.request_id]
