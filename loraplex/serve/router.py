"""Ray Serve request routers for the engine replicas: `AffinityRouter` (serve/routing.py's order)
and `RoundRobinRouter` (a baseline for the benchmarks).

Ray Serve creates one router per deployment handle in the process that calls the replicas (the
ingress) and runs it on its own event loop; `choose_replicas` returns ranks of replicas, and Serve
sends the request to the first one whose queue is below `max_ongoing_requests`.

What a router reads from a request: the keyword arguments of `EngineReplica.generate`
(serve/replica.py) — `adapter` (the engine's adapter name or None), `replica` (a replica id the
caller insists on; ignored when no such replica is running), `avoid` (replica ids that failed
this request; skipped while another replica is running).

What it reads from a replica: its routing stats (`EngineReplica.record_routing_stats`, collected
by Ray Serve every `ScaleoutConfig.routing_stats_period_s`: its adapters in slots and in host
memory, its requests in flight), and the queue length Serve last probed. Load is the largest of
those and the requests this router sent there that have not completed.

Each router publishes its running replicas (serve/live_replicas.py), so the ingress can name them
in /metrics without asking Ray. Ray Serve pickles this module by value into the process that
routes: module-level state here would be private to the router's copy.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from loraplex.serve import live_replicas
from loraplex.serve.routing import ReplicaView, StickyMap, rank_replicas


class _PublishingRouter(RequestRouter):
    """Publishes its replicas; honours `replica` and `avoid`; keeps per-replica in-flight counts."""

    def initialize_state(self, **kwargs) -> None:
        self._in_flight: Counter = Counter()  # replica id → requests routed there, not completed
        self._routed: dict[str, str] = {}  # internal request id → replica id

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live_replicas.publish(self._deployment_id.app_name, {r.replica_id.unique_id: r for r in replicas})

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self._routed[pending_request.metadata.internal_request_id] = replica_id.unique_id
        self._in_flight[replica_id.unique_id] += 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        rid = self._routed.pop(internal_request_id, None)
        if rid is not None:
            self._in_flight[rid] -= 1
            if self._in_flight[rid] <= 0:
                del self._in_flight[rid]

    def load(self, replica: RunningReplica) -> int:
        rid = replica.replica_id
        probed = self.replica_queue_len_cache.get(rid) or 0
        reported = (replica.routing_stats or {}).get("in_flight", 0)
        return max(self._in_flight[rid.unique_id], probed, reported)

    def eligible(self, candidates: list[RunningReplica], pending: PendingRequest | None) -> list[RunningReplica]:
        """`replica` alone when it names a running one; else the candidates minus `avoid` (all of
        them if that leaves none)."""
        kwargs = pending.kwargs if pending is not None else {}
        by_id = {r.replica_id.unique_id: r for r in candidates}
        forced = kwargs.get("replica")
        if forced in by_id:
            return [by_id[forced]]
        avoid = set(kwargs.get("avoid") or ())
        return [r for r in candidates if r.replica_id.unique_id not in avoid] or list(candidates)


class AffinityRouter(_PublishingRouter):
    """Adapter affinity (serve/routing.py). request_router_kwargs: spill_in_flight, sticky_s."""

    def initialize_state(self, spill_in_flight: int = 32, sticky_s: float = 30.0, **kwargs) -> None:
        super().initialize_state()
        self._spill_in_flight = spill_in_flight
        self._sticky = StickyMap(sticky_s)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        replicas = self.eligible(candidate_replicas, pending_request)
        if len(replicas) <= 1:
            return [replicas]
        adapter = pending_request.kwargs.get("adapter") if pending_request is not None else None
        now = time.monotonic()
        views = []
        for r in replicas:
            stats = r.routing_stats or {}
            views.append(ReplicaView(r.replica_id.unique_id, self.load(r), frozenset(stats.get("slots", ())),
                                     frozenset(stats.get("host", ()))))
        order = rank_replicas(adapter, views, spill_in_flight=self._spill_in_flight,
                              sticky_replica=None if adapter is None else self._sticky.get(adapter, now),
                              adapters_sent=self._sticky.adapters_per_replica(now))
        by_id = {r.replica_id.unique_id: r for r in replicas}
        return [[by_id[rid]] for rid in order]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        super().on_request_routed(pending_request, replica_id, result)
        adapter = pending_request.kwargs.get("adapter")
        if adapter is not None:
            self._sticky.note(adapter, replica_id.unique_id, time.monotonic())

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._sticky.forget_replica(replica_id.unique_id)


class RoundRobinRouter(_PublishingRouter):
    """Each request to the next replica in turn, whatever it asks for (a baseline)."""

    def initialize_state(self, **kwargs) -> None:
        super().initialize_state()
        self._turn = itertools.count()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        replicas = sorted(self.eligible(candidate_replicas, pending_request), key=lambda r: r.replica_id.unique_id)
        if not replicas:
            return []
        start = next(self._turn) % len(replicas)
        return [[r] for r in replicas[start:] + replicas[:start]]
