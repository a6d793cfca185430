"""Per-replica metrics of the scale-out ingress, next to the usual ones (api/metrics.py).

The usual engine gauges and adapter-cache counters of /metrics are, behind the ingress, sums over
the replicas (RemoteEngine.stats / cache_stats). This collector adds each replica's own, labelled
`replica` (its id), read at scrape time from the replicas' latest routing stats (they lag by Ray
Serve's collection period):

- loraplex_replica_requests_in_flight, _requests_waiting, _requests_running, _lora_slots_occupied,
  _kv_blocks_used;
- loraplex_replica_adapter_loads_total{replica, tier}: host → slot copies, disk → host parses,
  remote downloads;
- loraplex_replica_adapter_resident{replica, adapter, tier="slot"|"host"} = 1 for each resident
  adapter (bounded: at most slots + host-cache entries per replica).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class ReplicaCollector:
    def __init__(self, replicas: Callable[[], dict[str, dict]]):
        """replicas(): replica id → its routing stats (RemoteEngine.replicas)."""
        self._replicas = replicas

    def collect(self):
        reports = self._replicas()
        gauges = {
            "requests_in_flight": ("Requests in flight on the replica.", lambda r: r.get("in_flight", 0)),
            "requests_waiting": ("Requests queued on the replica.", lambda r: r["engine"]["waiting"]),
            "requests_running": ("Requests in the replica's running batch.", lambda r: r["engine"]["running"]),
            "lora_slots_occupied": ("The replica's device slots holding or loading an adapter.",
                                    lambda r: r["engine"]["lora_slots_occupied"]),
            "kv_blocks_used": ("The replica's KV-cache blocks in use.",
                               lambda r: r["engine"]["kv_blocks_total"] - r["engine"]["kv_blocks_free"]),
        }
        for name, (doc, read) in gauges.items():
            family = GaugeMetricFamily(f"loraplex_replica_{name}", doc, labels=["replica"])
            for rid, report in sorted(reports.items()):
                if "engine" in report:
                    family.add_metric([rid], read(report))
            yield family
        loads = CounterMetricFamily("loraplex_replica_adapter_loads", "Adapter loads finished on the replica, per tier they came from.",
                                    labels=["replica", "tier"])
        resident = GaugeMetricFamily("loraplex_replica_adapter_resident", "1 per adapter resident on the replica, per tier.",
                                     labels=["replica", "adapter", "tier"])
        for rid, report in sorted(reports.items()):
            if "engine" not in report:
                continue
            cache = report.get("cache", {})
            for tier, value in (("remote", cache.get("downloads", 0)), ("disk", cache.get("loads", 0)),
                                ("host", report["engine"]["slot_loads"])):
                loads.add_metric([rid, tier], value)
            for tier in ("slot", "host"):
                for adapter in report.get("slots" if tier == "slot" else "host", ()):
                    resident.add_metric([rid, adapter, tier], 1)
        yield loads
        yield resident
