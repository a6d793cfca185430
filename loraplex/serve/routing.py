"""Adapter-affinity routing as a pure decision: which replicas, in which order, for one request.

No Ray here (serve/router.py feeds it Ray Serve's replicas); no clock read here (callers pass `now`).

The order for a request of adapter `a` (first the best):

1. replicas below the spill bound (`in_flight < spill_in_flight`) before those at or above it —
   an overloaded replica's adapters spill to the others, which load them (no head-of-line
   blocking); when every replica is overloaded, the least loaded still comes first;
2. then by where `a` lives: where it was last sent (within the sticky window), then in a device
   slot, then in host memory, then nowhere (cold);
3. then the least in flight; then (cold ones) the fewest adapters recently sent there, so new
   adapters spread over the replicas instead of piling onto the first idle one; then the id.

The base model (`adapter` None) has no residency: least in flight first, then the id.

Residency comes from the replicas' reports, which lag (Ray Serve collects them periodically), so
`StickyMap` remembers where each adapter was sent lately: a second request for an adapter follows
the first even before any report says the adapter arrived there, and an adapter resident on two
replicas keeps to the one it was last sent to (no flip-flop on stale load figures).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import NamedTuple


class ReplicaView(NamedTuple):
    """What routing knows about one replica. in_flight: its requests not finished; slots / host:
    the adapters its latest report shows in a device slot (loading included) / in host memory."""

    id: str
    in_flight: int
    slots: frozenset[str] = frozenset()
    host: frozenset[str] = frozenset()


STICKY, SLOT, HOST, COLD = 0, 1, 2, 3


class StickyMap:
    """adapter → (replica id, when last sent there), at most `max_entries` (least recently sent
    dropped first); an entry older than `ttl_s` no longer counts. Not thread-safe: the owner (the
    router, on Ray Serve's router event loop) is its only user."""

    def __init__(self, ttl_s: float, max_entries: int = 65536):
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self._sent: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def note(self, adapter: str, replica: str, now: float) -> None:
        self._sent[adapter] = (replica, now)
        self._sent.move_to_end(adapter)
        while len(self._sent) > self.max_entries:
            self._sent.popitem(last=False)

    def get(self, adapter: str, now: float) -> str | None:
        entry = self._sent.get(adapter)
        if entry is None or now - entry[1] > self.ttl_s:
            return None
        return entry[0]

    def adapters_per_replica(self, now: float) -> Counter:
        """How many adapters were sent to each replica within the window."""
        return Counter(replica for replica, at in self._sent.values() if now - at <= self.ttl_s)

    def forget_replica(self, replica: str) -> None:
        for adapter in [a for a, (r, _) in self._sent.items() if r == replica]:
            del self._sent[adapter]


def tier_of(view: ReplicaView, adapter: str, sticky_replica: str | None) -> int:
    if view.id == sticky_replica:
        return STICKY
    if adapter in view.slots:
        return SLOT
    return HOST if adapter in view.host else COLD


def rank_replicas(adapter: str | None, replicas: list[ReplicaView], *, spill_in_flight: int,
                  sticky_replica: str | None = None, adapters_sent: Counter | None = None) -> list[str]:
    """The replicas' ids, best first (see the module docstring). sticky_replica: where `adapter`
    was last sent within the sticky window (StickyMap.get); adapters_sent: StickyMap.adapters_per_replica."""
    sent = adapters_sent or Counter()

    def key(view: ReplicaView):
        overloaded = view.in_flight >= spill_in_flight
        if adapter is None:
            return (overloaded, view.in_flight, view.id)
        tier = tier_of(view, adapter, sticky_replica)
        spread = sent[view.id] if tier == COLD else 0
        return (overloaded, view.in_flight if overloaded else 0, tier, view.in_flight, spread, view.id)

    return [view.id for view in sorted(replicas, key=key)]
