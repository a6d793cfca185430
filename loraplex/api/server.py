"""Build a serving ApiContext from options, and run it with uvicorn.

Layout of the data dir: `registry.sqlite` (accounts, tokens, finetunes), `objects/` (the default
local object store), `uploads/` (staging), `models/` (the converted default model),
`adapter-cache/` (per-engine download caches).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.adapters.registry import Registry
from loraplex.adapters.storage import open_store
from loraplex.api.context import ApiContext, Limits
from loraplex.api.metrics import Metrics
from loraplex.config import (DEFAULT_MAX_ADAPTER_BYTES, DEFAULT_MAX_FINETUNES_PER_ACCOUNT, DEFAULT_MAX_LORA_RANK,
                             CacheConfig, EngineConfig, HttpConfig, LoraConfig, MetricsConfig, ModelConfig,
                             SchedulerConfig)
from loraplex.engine.async_engine import AsyncEngine
from loraplex.engine.engine import LLMEngine, resolve_model_dir
from loraplex.training.files import FileStore
from loraplex.training.jobs import JobStore

DEFAULT_MODEL_NAME = "@cf/huggingface/smollm2-135m-instruct"


@dataclass(frozen=True)
class ServerOptions:
    data_dir: Path
    model: str = "default"
    model_name: str | None = None  # default: DEFAULT_MODEL_NAME for "default", else the folder's name
    storage: str | None = None  # object store URL; default: file://<data_dir>/objects
    dtype: str = "auto"
    device: str = "auto"
    max_loras: int = 8
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK
    max_model_len: int | None = None
    kv_cache_memory: int | float | None = None
    prefix_caching: bool = CacheConfig().prefix_caching
    max_num_seqs: int = 128
    max_pending: int = 256  # requests in flight before 429 / 3040
    max_finetunes_per_account: int = DEFAULT_MAX_FINETUNES_PER_ACCOUNT
    max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES
    retry_failed_adapter_after_s: float = 5.0
    adapter_host_cache_bytes: int = 1 << 30  # parsed adapters kept in host memory
    adapter_disk_cache_bytes: int = 4 << 30  # downloaded adapter files kept on local disk
    adapter_workers: int = 2  # threads downloading and parsing adapters
    admin_token: str | None = None  # enables the operator routes (/admin/…); see api/admin.py
    max_finetune_metric_labels: int = MetricsConfig().max_finetune_labels
    http: HttpConfig = field(default_factory=HttpConfig)  # connection cap, header/body/keep-alive timeouts
    metrics_token: str | None = None  # /metrics wants `Authorization: Bearer <it>`; None: /metrics is open
    docs: bool = True  # serve /docs, /redoc and /openapi.json (public: they describe the API, hold no data)

    @property
    def served_name(self) -> str:
        if self.model_name:
            return self.model_name
        return DEFAULT_MODEL_NAME if self.model == "default" else Path(self.model).name


def open_registry(data_dir: Path, max_finetunes_per_account: int = DEFAULT_MAX_FINETUNES_PER_ACCOUNT) -> Registry:
    data_dir.mkdir(parents=True, exist_ok=True)
    return Registry(data_dir / "registry.sqlite", max_finetunes_per_account=max_finetunes_per_account)


def open_jobs(data_dir: Path) -> JobStore:
    """The job store; jobs a previous process left `running` are marked failed (one API process per data dir)."""
    jobs = JobStore(data_dir)
    jobs.fail_interrupted()
    return jobs


def engine_config(opts: ServerOptions) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(opts.model, dtype=opts.dtype, device=opts.device, max_model_len=opts.max_model_len),
        cache=CacheConfig(kv_cache_memory=opts.kv_cache_memory, prefix_caching=opts.prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=opts.max_num_seqs),
        lora=LoraConfig(max_loras=opts.max_loras, max_lora_rank=opts.max_lora_rank,
                        retry_failed_after_s=opts.retry_failed_adapter_after_s,
                        host_cache_bytes=opts.adapter_host_cache_bytes, disk_cache_bytes=opts.adapter_disk_cache_bytes,
                        cache_workers=opts.adapter_workers),
        data_dir=str(opts.data_dir),
    )


def build_context(opts: ServerOptions) -> ApiContext:
    """Load the model and open the registry and store (slow: seconds). The engine thread is
    started by the app's lifespan. Uploads a previous process was staging when it died are
    removed (one API process per data dir)."""
    shutil.rmtree(opts.data_dir / "uploads", ignore_errors=True)
    store = open_store(opts.storage or (opts.data_dir / "objects").resolve().as_uri())
    engine = LLMEngine(engine_config(opts), adapter_store=store)
    async_engine = AsyncEngine(engine, max_pending=opts.max_pending)
    return ApiContext(
        engine=async_engine,
        registry=open_registry(opts.data_dir, opts.max_finetunes_per_account),
        store=store,
        tokenizer=engine.tokenizer,
        model_args=engine.model_args,
        model_name=opts.served_name,
        max_model_len=engine.max_model_len,
        limits=Limits(max_adapter_bytes=opts.max_adapter_bytes, max_lora_rank=opts.max_lora_rank),
        metrics=Metrics(async_engine.stats, lambda: async_engine.num_in_flight, engine.adapter_cache.stats,
                        MetricsConfig(max_finetune_labels=opts.max_finetune_metric_labels)),
        upload_dir=opts.data_dir / "uploads",
        admin_token=opts.admin_token,
        metrics_token=opts.metrics_token,
        docs=opts.docs,
        files=FileStore(opts.data_dir),
        jobs=open_jobs(opts.data_dir),
        model_dir=resolve_model_dir(opts.model, opts.data_dir),
    )
