"""Frozen configuration, one dataclass per subsystem, combined into EngineConfig: the one source
of every default. Each engine setting has one name (its field's), used by `LLM(**settings)`,
`ServerOptions` and the `loraplex serve --flags` (flag = the name with dashes, without a `_bytes`
or `_s` unit suffix); its help text lives here too (`setting`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

DEFAULT_HOST = "127.0.0.1"  # `loraplex serve` binds here, and the client commands call it
DEFAULT_PORT = 8787
DEFAULT_DATA_DIR = "~/.local/share/loraplex"  # when LORAPLEX_DATA_DIR is not set (see env.data_dir)
# Workers AI's published limits for LoRA finetunes (rank, file size, finetunes per account): the
# defaults of `loraplex serve` and of the offline LLM, each configurable. MAX_LORA_RANK is also
# the device slot rank (slots are zero-padded to it), so it sizes slot memory and LoRA compute.
DEFAULT_MAX_LORA_RANK = 32
DEFAULT_MAX_ADAPTER_BYTES = 300 * 10**6  # adapter_model.safetensors, at most
DEFAULT_MAX_FINETUNES_PER_ACCOUNT = 100  # every finetune counts, whatever its state
DEFAULT_MAX_PENDING = 256  # requests in flight (queued or running) before 429 / "retry later"
# Per-request bounds of SamplingParams (the engine refuses beyond them; the API's schemas use the
# same numbers, so an HTTP client gets a 400 naming the field).
MAX_STOP_STRINGS = 16  # stop strings per request
MAX_STOP_STRING_CHARS = 256  # characters per stop string
MAX_TOP_LOGPROBS = 20  # alternatives per token with `top_logprobs` (OpenAI's limit)
GREEDY_BELOW_TEMPERATURE = 1e-5  # a temperature below this decodes greedily (exact in the limit)
MIN_REPETITION_PENALTY = 0.01  # smaller ones divide logits into inf/NaN territory


def setting(default: Any, help: str, parse: type | str | None = None) -> Any:
    """A setting's default and one-line help. parse: how the CLI reads it when the default does
    not say (None default): a type, or "bytes" ("2GiB") / "bytes_or_fraction" ("0.5")."""
    return field(default=default, metadata={"help": help, "parse": parse or type(default)})


@dataclass(frozen=True)
class ModelConfig:
    model: str  # a Hugging Face folder, or "default" for the embedded SmolLM2-135M-Instruct
    dtype: str = setting("auto", "float32 | bfloat16 | float16 | auto")
    device: str = setting("auto", "cpu | cuda | auto")
    max_model_len: int | None = setting(None, "context window (default: the model's)", int)
    cuda_graphs: bool = setting(True, "replay CUDA graphs for decode steps (CUDA, graph-safe attention)")


def _require_positive(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = setting(16, "tokens per KV block")
    kv_cache_memory: int | float | None = setting(
        None, "KV cache: bytes, or a fraction of free device memory (default: 0.9 of free GPU memory "
        "after the weights; 0.25 of available host memory on CPU)", "bytes_or_fraction")
    prefix_caching: bool = setting(True, "reuse the KV blocks of a prompt prefix seen before (same adapter)")

    def __post_init__(self) -> None:
        _require_positive(self, "block_size")
        if self.kv_cache_memory is not None and not self.kv_cache_memory > 0:
            raise ValueError(f"kv_cache_memory must be > 0, got {self.kv_cache_memory!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = setting(128, "running sequences at most")
    max_num_batched_tokens: int = setting(1024, "tokens per step; longer prompts are prefilled in chunks")

    def __post_init__(self) -> None:
        _require_positive(self, "max_num_seqs", "max_num_batched_tokens")


@dataclass(frozen=True)
class LoraConfig:
    max_loras: int = setting(8, "device slots for adapters")
    max_lora_rank: int = setting(DEFAULT_MAX_LORA_RANK, "highest adapter rank, also the slot rank")
    adapter_host_cache_bytes: int = setting(1 << 30, "parsed adapters kept in host memory (pinned ones may exceed it)",
                                            "bytes")
    adapter_disk_cache_bytes: int = setting(4 << 30, "adapter files downloaded from the store, kept on local disk",
                                            "bytes")
    storage: str | None = setting(None, "object store of adapters: file:///… or s3://bucket/prefix", str)
    retry_failed_adapter_after_s: float = setting(5.0, "seconds before an adapter whose load failed is tried again")
    adapter_workers: int = setting(2, "threads that download and parse adapters (off the engine step)")

    def __post_init__(self) -> None:
        _require_positive(self, "max_loras", "max_lora_rank", "adapter_workers")
        if self.max_lora_rank > 64:
            raise ValueError(f"max_lora_rank is at most 64, got {self.max_lora_rank}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data_dir: str | None = None  # the default model and the adapter download cache; None: LORAPLEX_DATA_DIR


_SECTIONS = (ModelConfig, CacheConfig, SchedulerConfig, LoraConfig)


def engine_settings() -> dict[str, Any]:
    """Every engine setting, by its one name → its dataclass field (the model itself excluded)."""
    return {f.name: f for section in _SECTIONS for f in fields(section) if f.name != "model"}


def engine_config(model: str, data_dir: str | None = None, **settings: Any) -> EngineConfig:
    """An EngineConfig from settings named as in `engine_settings()` (others: TypeError); the
    sections check their values (ValueError)."""
    unknown = set(settings) - set(engine_settings())
    if unknown:
        raise TypeError(f"unknown engine settings: {', '.join(sorted(unknown))}")

    def build(section, **given):
        return section(**given, **{f.name: settings[f.name] for f in fields(section) if f.name in settings})

    return EngineConfig(model=build(ModelConfig, model=model), cache=build(CacheConfig),
                        scheduler=build(SchedulerConfig), lora=build(LoraConfig), data_dir=data_dir)


@dataclass(frozen=True)
class PageConfig:
    """Pagination of the API's list routes (Cloudflare v4 `page` / `per_page`, or `limit` / `offset`)."""

    default_per_page: int = 50  # items per page when the caller names no size (≥ the default finetunes cap of 30)
    max_per_page: int = 1000  # a larger `per_page` / `limit` is refused (400 / 5004)


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus label bounds: per-finetune counters label the first `max_finetune_labels`
    finetune ids seen by a server process; later ones are counted under "other"."""

    max_finetune_labels: int = 100


@dataclass(frozen=True)
class HttpConfig:
    """Connection-level bounds of the HTTP server (see loraplex/api/connections.py)."""

    max_connections: int = 512  # open connections at most; one more is answered 503 and closed
    header_timeout_s: float = 10.0  # from a connection's (or a keep-alive request's) first byte to its full headers
    body_timeout_s: float = 30.0  # longest pause between two pieces of a request body
    keep_alive_timeout_s: float = 5.0  # an idle keep-alive connection is closed after this long

    def __post_init__(self) -> None:
        _require_positive(self, "max_connections")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class RequestLogConfig:
    """Request logs (opt-in per account; see loraplex/training/logs.py and api/request_log.py).

    An account's settings start at `default_enabled` / `default_retention_days`; a PUT may set
    `retention_days` within [min_retention_days, max_retention_days]. Each account keeps at most
    `max_entries_per_account` entries (the oldest are dropped to make room); an entry whose text
    (messages, prompt, response, correction) exceeds `max_entry_bytes` is not stored (counted as
    dropped). Records wait in a queue of `max_queued` for the writer thread; a record that finds
    it full is dropped and counted, never waited for. Expired entries are deleted on each write
    of the account and by a sweep of all accounts every `sweep_interval_s`."""

    default_enabled: bool = False
    default_retention_days: int = 30
    min_retention_days: int = 1
    max_retention_days: int = 365
    max_entries_per_account: int = 10_000
    max_entry_bytes: int = 256 * 2**10
    max_queued: int = 1024
    sweep_interval_s: float = 600.0
    max_per_page: int = 100  # entries per page of the list (each up to max_entry_bytes)

    def __post_init__(self) -> None:
        _require_positive(self, "default_retention_days", "min_retention_days", "max_retention_days",
                          "max_entries_per_account", "max_entry_bytes", "max_queued", "max_per_page")
        if not self.min_retention_days <= self.default_retention_days <= self.max_retention_days:
            raise ValueError("default_retention_days must lie within [min_retention_days, max_retention_days]")
        if not self.sweep_interval_s > 0:
            raise ValueError(f"sweep_interval_s must be > 0, got {self.sweep_interval_s!r}")
