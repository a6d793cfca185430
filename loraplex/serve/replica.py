"""EngineReplica: one Ray Serve replica = one whole loraplex engine (its own model copy, KV cache,
device slots, host and disk adapter caches), driven by an AsyncEngine on the replica's event loop.

Contracts:

- Identity: `replica_id` is Ray Serve's id of this replica, stable for the replica's life (a
  replica Serve starts in place of a dead one has a new id).
- Adapters travel with each request: `generate(..., adapter=name, source=RemoteSource)` registers
  the adapter on first use, so any replica can serve any finetune from the shared object store
  (the ingress never has to tell a replica about an upload).
- Streams: `generate` yields this replica's id first, then the engine's cumulative RequestOutputs;
  a failure (a full queue, an adapter that will not load, a forgotten one) is yielded as the
  exception object itself, last, so that it reaches the ingress as the same domain error the
  single-process server raises. Cancelling the stream (the client left) aborts the request in the
  engine (AsyncEngine's contract).
- Routing stats (`record_routing_stats`, collected by Ray Serve): the adapters in device slots
  (copies in flight included) and in host memory, requests in flight, the engine's EngineStats
  and the adapter cache's counters — the router's and /metrics' view of this replica.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray import serve

from loraplex.adapters.cache import LocalSource, RemoteSource
from loraplex.api.server import ServerOptions, open_engine
from loraplex.core import SamplingParams
from loraplex.engine.async_engine import AsyncEngine
from loraplex.engine.engine import LLMEngine

log = logging.getLogger(__name__)


class EngineReplica:
    def __init__(self, options: ServerOptions):
        """Loads the model (seconds); `options` is the whole server's (engine settings, data dir,
        max_pending, and whatever later fields the replicas need, e.g. the registry)."""
        self.options = options
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        engine, _store = open_engine(options)
        self.engine = AsyncEngine(engine, max_pending=options.max_pending)
        self.engine.start()

    def __del__(self):  # Ray Serve calls it when the replica is shut down gracefully
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, cache_salt: str = "", *,
                       adapter: str | None = None, source: LocalSource | RemoteSource | None = None,
                       replica: str | None = None, avoid: tuple[str, ...] = ()) -> AsyncIterator[Any]:
        """This replica's id, then the cumulative outputs, or a failure last (see the module
        docstring). replica, avoid: routing hints read by the router (serve/router.py), unused here."""
        yield self.replica_id
        try:
            if adapter is not None:
                await self.engine.ensure_lora(adapter, source)
            async for out in self.engine.generate(prompt_token_ids, params, adapter, cache_salt=cache_salt):
                yield out
        except Exception as e:
            yield _portable(e)

    async def forget_lora(self, name: str) -> tuple[str, bool]:
        """AsyncEngine.forget_lora here; (this replica's id, whether it was unregistered at once)."""
        return self.replica_id, await self.engine.forget_lora(name)

    async def call(self, fn: Callable[[LLMEngine], Any]) -> tuple[str, Any]:
        """fn(engine) on this replica's engine thread; (this replica's id, its result)."""
        return self.replica_id, await self.engine.call(fn)

    async def model_info(self) -> dict:
        engine = self.engine.engine
        return {"model_args": engine.model_args, "max_model_len": engine.max_model_len}

    async def record_routing_stats(self) -> dict[str, Any]:
        snapshot = await self.engine.call(lambda engine: engine.adapters.snapshot())
        return {
            "replica": self.replica_id,
            "slots": [r["adapter"] for r in snapshot["slots"]["residents"]],
            "host": [a["adapter"] for a in snapshot["host"]["adapters"]],
            "in_flight": self.engine.num_in_flight,
            "engine": self.engine.stats()._asdict(),
            "cache": self.engine.engine.adapters.stats(),
        }


def _portable(error: Exception) -> Exception:
    """`error` if it survives pickling (domain errors do), else a plain RuntimeError saying what it was."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
