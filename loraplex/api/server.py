"""Build a serving ApiContext from options, and run it with uvicorn.

Layout of the data dir: `registry.sqlite` (accounts, tokens, finetunes), `objects/` (the default
local object store), `uploads/` (staging), `models/` (the converted default model),
`adapter-cache/` (per-engine download caches).
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.adapters.registry import Registry
from loraplex.adapters.storage import open_store
from loraplex.api.context import ApiContext, Limits
from loraplex.api.metrics import Metrics
from loraplex.api.request_log import RequestLogs
from loraplex.config import (DEFAULT_MAX_ADAPTER_BYTES, DEFAULT_MAX_FINETUNES_PER_ACCOUNT, DEFAULT_MAX_PENDING,
                             EngineConfig, HttpConfig, MetricsConfig, RequestLogConfig, engine_config)
from loraplex.engine.async_engine import AsyncEngine
from loraplex.engine.engine import LLMEngine, resolve_model_dir
from loraplex.training.files import FileStore
from loraplex.training.jobs import JobStore
from loraplex.training.log_writer import LogWriter
from loraplex.training.logs import SqliteLogStore

DEFAULT_MODEL_NAME = "@cf/huggingface/smollm2-135m-instruct"


@dataclass(frozen=True)
class ServerOptions:
    """What `loraplex serve` runs: the engine (every engine setting, see config.engine_settings;
    its data_dir is the server's) and the server's own settings. Defaults: loraplex/config.py."""

    data_dir: Path
    engine: EngineConfig = field(default_factory=lambda: engine_config("default"))
    model_name: str | None = None  # default: DEFAULT_MODEL_NAME for "default", else the folder's name
    max_pending: int = DEFAULT_MAX_PENDING
    max_finetunes_per_account: int = DEFAULT_MAX_FINETUNES_PER_ACCOUNT
    max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES
    admin_token: str | None = None  # enables the operator routes (/admin/…); see api/admin.py
    max_finetune_metric_labels: int = MetricsConfig().max_finetune_labels
    http: HttpConfig = field(default_factory=HttpConfig)  # connection cap, header/body/keep-alive timeouts
    metrics_token: str | None = None  # /metrics wants `Authorization: Bearer <it>`; None: /metrics is open
    docs: bool = True  # serve /docs, /redoc and /openapi.json (public: they describe the API, hold no data)
    request_logs: RequestLogConfig = field(default_factory=RequestLogConfig)  # defaults and bounds of request logs

    @property
    def served_name(self) -> str:
        if self.model_name:
            return self.model_name
        model = self.engine.model.model
        return DEFAULT_MODEL_NAME if model == "default" else Path(model).name


def open_registry(data_dir: Path, max_finetunes_per_account: int = DEFAULT_MAX_FINETUNES_PER_ACCOUNT) -> Registry:
    data_dir.mkdir(parents=True, exist_ok=True)
    return Registry(data_dir / "registry.sqlite", max_finetunes_per_account=max_finetunes_per_account)


def open_jobs(data_dir: Path) -> JobStore:
    """The job store; jobs a previous process left `running` are marked failed (one API process per data dir)."""
    jobs = JobStore(data_dir)
    jobs.fail_interrupted()
    return jobs


def open_request_logs(data_dir: Path, config: RequestLogConfig, metrics: Metrics) -> RequestLogs:
    """The request-log store in the data dir and its writer (started and stopped with the app)."""
    writer = LogWriter(SqliteLogStore(data_dir, config),
                       on_drop=lambda why: metrics.request_logs_dropped.labels(why).inc(),
                       on_written=metrics.request_logs_written.inc)
    return RequestLogs(writer.store, writer)


def build_context(opts: ServerOptions) -> ApiContext:
    """Load the model and open the registry and store (slow: seconds). The engine thread is
    started by the app's lifespan. Uploads a previous process was staging when it died are
    removed (one API process per data dir)."""
    shutil.rmtree(opts.data_dir / "uploads", ignore_errors=True)
    config = dataclasses.replace(opts.engine, data_dir=str(opts.data_dir))
    store = open_store(config.lora.storage or (opts.data_dir / "objects").resolve().as_uri())
    engine = LLMEngine(config, adapter_store=store)
    async_engine = AsyncEngine(engine, max_pending=opts.max_pending)
    metrics = Metrics(async_engine.stats, lambda: async_engine.num_in_flight, engine.adapters.stats,
                      MetricsConfig(max_finetune_labels=opts.max_finetune_metric_labels))
    return ApiContext(
        engine=async_engine,
        registry=open_registry(opts.data_dir, opts.max_finetunes_per_account),
        store=store,
        tokenizer=engine.tokenizer,
        model_args=engine.model_args,
        model_name=opts.served_name,
        max_model_len=engine.max_model_len,
        limits=Limits(max_adapter_bytes=opts.max_adapter_bytes, max_lora_rank=config.lora.max_lora_rank),
        metrics=metrics,
        upload_dir=opts.data_dir / "uploads",
        admin_token=opts.admin_token,
        metrics_token=opts.metrics_token,
        docs=opts.docs,
        files=FileStore(opts.data_dir),
        jobs=open_jobs(opts.data_dir),
        model_dir=resolve_model_dir(config.model.model, opts.data_dir),
        request_logs=open_request_logs(opts.data_dir, opts.request_logs, metrics),
    )
