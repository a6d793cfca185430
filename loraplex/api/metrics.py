"""Prometheus metrics of one server (its own CollectorRegistry, so several apps can coexist).

Per-finetune counters (`loraplex_finetune_requests_total`, `…_prompt_tokens_total`,
`…_generation_tokens_total`) are labelled `finetune` with the finetune's id ("base" for the base
model); the label set is bounded: past `MetricsConfig.max_finetune_labels` distinct ids, new
ones count under "other". Account names never appear in labels.

Request-path metrics are recorded as requests finish; queue depth, KV blocks, slot occupancy and
the adapter cache's counters are read at scrape time from the engine's latest snapshot and the
cache's stats (both safe to read from any thread).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from loraplex.config import MetricsConfig
from loraplex.engine.engine import EngineStats

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _EngineCollector:
    def __init__(self, engine_stats: Callable[[], EngineStats], in_flight: Callable[[], int],
                 cache_stats: Callable[[], dict]):
        self._engine_stats, self._in_flight, self._cache_stats = engine_stats, in_flight, cache_stats

    def collect(self):
        s = self._engine_stats()
        gauges = {
            "loraplex_requests_waiting": ("Requests queued, not yet running (incl. waiting for their adapter).", s.waiting),
            "loraplex_requests_running": ("Requests in the running batch.", s.running),
            "loraplex_requests_in_flight": ("Requests admitted by the API and not finished.", self._in_flight()),
            "loraplex_kv_blocks_total": ("Paged KV-cache blocks.", s.kv_blocks_total),
            "loraplex_kv_blocks_used": ("KV-cache blocks in use.", s.kv_blocks_total - s.kv_blocks_free),
            "loraplex_lora_slots_total": ("Device slots for LoRA adapters.", s.lora_slots_total),
            "loraplex_lora_slots_occupied": ("Device slots holding or loading an adapter.", s.lora_slots_occupied),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        c = self._cache_stats()
        hits = CounterMetricFamily("loraplex_adapter_cache_hits", "Adapter requests served by a tier.", labels=["tier"])
        misses = CounterMetricFamily("loraplex_adapter_cache_misses", "Adapter requests a tier could not serve.",
                                     labels=["tier"])
        for tier in ("host", "disk"):
            hits.add_metric([tier], c[f"{tier}_hits"])
            misses.add_metric([tier], c[f"{tier}_misses"])
        loads = CounterMetricFamily("loraplex_adapter_loads", "Adapter loads finished, per tier they came from.",
                                    labels=["tier"])
        seconds = CounterMetricFamily("loraplex_adapter_load_seconds",
                                      "Time spent loading adapters, per tier they came from.", labels=["tier"])
        for tier, count, total in (("remote", c["downloads"], c["download_seconds"]),
                                   ("disk", c["loads"], c["parse_seconds"]),
                                   ("host", s.slot_loads, s.slot_load_seconds)):
            loads.add_metric([tier], count)
            seconds.add_metric([tier], total)
        yield from (hits, misses, loads, seconds)
        yield CounterMetricFamily("loraplex_adapter_load_errors", "Adapter loads that failed.", value=c["errors"])
        prefix = {
            "loraplex_prefix_cache_queried_tokens": ("Prompt tokens of admitted requests looked up in the prefix cache.",
                                                     s.prefix_queried_tokens),
            "loraplex_prefix_cache_hit_tokens": ("Prompt tokens found in the prefix cache (not computed again).",
                                                 s.prefix_hit_tokens),
            "loraplex_prefix_cache_evictions": ("Cached KV blocks evicted for other tokens.", s.prefix_evictions),
        }
        for name, (doc, value) in prefix.items():
            yield CounterMetricFamily(name, doc, value=value)
        host = GaugeMetricFamily("loraplex_adapter_cache_bytes", "Bytes held by a cache tier.", labels=["tier"])
        host.add_metric(["host"], c["host_bytes"])
        host.add_metric(["disk"], c["disk_bytes"])
        yield host


class Metrics:
    def __init__(self, engine_stats: Callable[[], EngineStats], in_flight: Callable[[], int],
                 cache_stats: Callable[[], dict], config: MetricsConfig = MetricsConfig()):
        self._config = config
        self._finetune_labels: set[str] = set()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("loraplex_requests", "HTTP requests answered.", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens of generation requests.", registry=r)
        self.generation_tokens = Counter("loraplex_generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram("loraplex_time_to_first_token_seconds", "Time from arrival to the first token.",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("loraplex_time_per_output_token_seconds", "Mean time between output tokens, per request.",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.finetune_requests = Counter("loraplex_finetune_requests", "Generation requests per finetune.",
                                         ["finetune"], registry=r)
        self.finetune_prompt_tokens = Counter("loraplex_finetune_prompt_tokens", "Prompt tokens per finetune.",
                                              ["finetune"], registry=r)
        self.finetune_generation_tokens = Counter("loraplex_finetune_generation_tokens",
                                                  "Tokens generated per finetune.", ["finetune"], registry=r)
        self.request_logs_written = Counter("loraplex_request_logs_written", "Request-log entries stored.",
                                            registry=r)
        self.request_logs_dropped = Counter(
            "loraplex_request_logs_dropped",
            "Request-log records not stored, by reason (queue_full, too_large, store_error).", ["reason"], registry=r)
        r.register(_EngineCollector(engine_stats, in_flight, cache_stats))

    def finetune_label(self, finetune_id: str | None) -> str:
        """The `finetune` label for a finetune id: the id itself while the label set has room,
        "base" for the base model, "other" once the bound is reached (event-loop thread only)."""
        if finetune_id is None:
            return "base"
        if finetune_id not in self._finetune_labels:
            if len(self._finetune_labels) >= self._config.max_finetune_labels:
                return "other"
            self._finetune_labels.add(finetune_id)
        return finetune_id

    def count_finetune(self, finetune_id: str | None, prompt_tokens: int, generation_tokens: int) -> None:
        label = self.finetune_label(finetune_id)
        self.finetune_requests.labels(label).inc()
        self.finetune_prompt_tokens.labels(label).inc(prompt_tokens)
        self.finetune_generation_tokens.labels(label).inc(generation_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
