"""RemoteEngine: the AsyncEngine interface the API uses, served by engine replicas on Ray Serve.

The ingress's ApiContext.engine is one of these: api/ calls `generate`, `ensure_lora`,
`forget_lora`, `call`, `stats`, `num_in_flight`, `start`, `shutdown` exactly as on an AsyncEngine,
and never learns about Ray.

Contracts:

- Adapters: `ensure_lora(name, source)` only records the source (and refuses a forgotten name);
  each `generate` for `name` carries it, and the replica it lands on registers it on first use.
  `forget_lora` reaches every running replica (a replica started later never had it; the
  registry no longer resolves a deleted finetune).
- Admission: at most `max_pending` × replicas requests in flight through this ingress (QueueFull,
  as AsyncEngine). Each replica still enforces its own `max_pending`.
- Routing: the request's adapter name is a keyword of the replica call, read by the router
  (serve/router.py). `pinned_replica(id)` makes the calls in a block go to one replica when it runs.
- Replica ids: each output's replica is recorded by `replica_header.note_replica` (the
  `x-loraplex-replica` header).
- Faults: when the replica serving a request dies, the request is sent again to another one (up
  to `max_attempts` tries), unless outputs were already delivered and the request is not
  reproducible; a reproducible one (greedy, or seeded) resumes transparently: the new replica's
  outputs are skipped until they pass what was delivered, and they must repeat it token for token.
  Otherwise the stream ends with EngineFailure (a clean error event for a streaming client).
- `call(fn)`: fn(engine) on every running replica: {"replicas": {replica id: result}} (the
  admin view's shape behind the ingress: one residency snapshot per replica).
- `stats()` and `cache_stats()`: sums over the replicas' latest routing stats (they lag by Ray
  Serve's collection period); `replicas()` gives each one's own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from loraplex import errors
from loraplex.adapters.cache import LocalSource, RemoteSource
from loraplex.core import RequestOutput, SamplingParams
from loraplex.engine.async_engine import AdapterForgotten, EngineFailure, QueueFull
from loraplex.engine.engine import EngineStats
from loraplex.logs import event
from loraplex.serve.replica_header import note_replica
from loraplex.serve import live_replicas

log = logging.getLogger(__name__)
REPLICA_LOST = (RayActorError, ReplicaUnavailableError)
_PINNED: ContextVar[str | None] = ContextVar("loraplex_pinned_replica", default=None)


@contextmanager
def pinned_replica(replica_id: str | None):
    """Within the block, generations go to `replica_id` while it runs (operators, tests, benchmarks)."""
    token = _PINNED.set(replica_id)
    try:
        yield
    finally:
        _PINNED.reset(token)


def reproducible(params: SamplingParams) -> bool:
    """Whether two runs of a request give the same tokens: greedy, or sampled with a seed."""
    from loraplex.config import GREEDY_BELOW_TEMPERATURE

    return params.temperature < GREEDY_BELOW_TEMPERATURE or params.seed is not None


def _sum_dicts(dicts: list[dict]) -> dict:
    totals: dict = {}
    for d in dicts:
        for key, value in d.items():
            if isinstance(value, dict):
                totals[key] = _sum_dicts([totals.get(key, {}), value])
            else:
                totals[key] = totals.get(key, 0) + value
    return totals


class RemoteEngine:
    def __init__(self, handle: DeploymentHandle, app_name: str, num_replicas: int, max_pending: int,
                 max_attempts: int = 3):
        self._handle = handle
        self._stream = handle.options(stream=True)
        self.app_name = app_name
        self.max_pending = max_pending * num_replicas
        self.max_attempts = max_attempts
        self._in_flight = 0  # event-loop thread only
        self._sources: dict[str, LocalSource | RemoteSource] = {}
        self._forgotten: set[str] = set()

    # -- lifecycle (the replicas' lives are Ray Serve's) -------------------------------------------

    def start(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    # -- what the API reads ------------------------------------------------------------------------

    @property
    def num_in_flight(self) -> int:
        return self._in_flight

    def replicas(self) -> dict[str, dict]:
        """replica id → its latest routing stats (serve/replica.py record_routing_stats)."""
        return live_replicas.running(self.app_name)

    def stats(self) -> EngineStats:
        reports = [r["engine"] for r in self.replicas().values() if "engine" in r]
        return EngineStats(*(sum(r[f] for r in reports) for f in EngineStats._fields))

    def cache_stats(self) -> dict:
        """AdapterCache.stats summed over the replicas (nested counts, e.g. `states`, per key)."""
        return _sum_dicts([r.get("cache", {}) for r in self.replicas().values()])

    async def call(self, fn: Callable[[Any], Any]) -> dict:
        """fn(engine) on every running replica: {"replicas": {replica id: result}}. A replica that
        fails to answer (dying, restarting) is left out and logged; fn's own exception is raised."""
        results = await self._handle.broadcast("call", fn).results_async(return_exceptions=True)
        answered = {}
        for result in results:
            if isinstance(result, REPLICA_LOST):
                event(log, "replica did not answer", error=type(result).__name__)
            elif isinstance(result, BaseException):
                raise result
            else:
                answered[result[0]] = result[1]
        return {"replicas": dict(sorted(answered.items()))}

    async def model_info(self) -> dict:
        """{"model_args", "max_model_len"} of the model the replicas serve."""
        return await self._handle.model_info.remote()

    # -- adapters ----------------------------------------------------------------------------------

    async def ensure_lora(self, name: str, source: LocalSource | RemoteSource) -> None:
        if name in self._forgotten:
            raise AdapterForgotten(name)
        self._sources[name] = source

    async def forget_lora(self, name: str) -> bool:
        """Forget `name` on every running replica; whether every one unregistered it at once."""
        self._forgotten.add(name)
        self._sources.pop(name, None)
        results = await self._handle.broadcast("forget_lora", name).results_async(return_exceptions=True)
        return all(isinstance(r, tuple) and r[1] for r in results)

    # -- generation --------------------------------------------------------------------------------

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, lora: str | None = None,
                       cache_salt: str = "") -> AsyncIterator[RequestOutput]:
        """As AsyncEngine.generate, on a replica chosen by the router (see the module docstring)."""
        if self._in_flight >= self.max_pending:
            raise QueueFull(f"too many requests in flight ({self.max_pending}); retry later")
        if lora is not None and lora in self._forgotten:
            raise AdapterForgotten(lora)
        if lora is not None and lora not in self._sources:
            raise errors.InvalidInput(f"no LoRA adapter named '{lora}' has been added")
        self._in_flight += 1
        delivered: RequestOutput | None = None
        tried: list[str] = []
        try:
            for attempt in range(1, self.max_attempts + 1):
                call = self._stream.generate.remote(
                    prompt_token_ids, params, cache_salt, adapter=lora, source=self._sources.get(lora),
                    replica=_PINNED.get(), avoid=tuple(tried))
                replica = None
                try:
                    async for item in call:
                        if replica is None:
                            replica = item
                            continue
                        if isinstance(item, BaseException):
                            raise item
                        note_replica(replica)
                        if delivered is not None and not item.finished:
                            if len(item.token_ids) <= len(delivered.token_ids):
                                continue  # replayed after a lost replica: delivered already
                        if delivered is not None and item.token_ids[:len(delivered.token_ids)] != delivered.token_ids:
                            raise EngineFailure("the replica serving this request was lost, and its replay diverged")
                        delivered = item
                        yield item
                        if item.finished:
                            return
                    return
                except REPLICA_LOST as e:
                    tried.append(replica or "?")
                    event(log, "replica lost", replica=replica, attempt=attempt, error=type(e).__name__,
                          delivered_tokens=0 if delivered is None else len(delivered.token_ids))
                    if delivered is not None and not reproducible(params):
                        raise EngineFailure("the replica serving this request was lost; retry") from None
                    await asyncio.sleep(0.05 * attempt)
                finally:
                    call.cancel()
            raise EngineFailure(f"no replica could serve this request ({self.max_attempts} tried); retry later")
        finally:
            self._in_flight -= 1
