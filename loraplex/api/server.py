"""Build a serving ApiContext from options, and run it with uvicorn.

Layout of the data dir: `registry.sqlite` (accounts, tokens, finetunes) and `training.sqlite`
(fine-tuning files' rows, jobs, request logs; training/database.py), both unless the options name
a PostgreSQL registry (then both live in that database), `objects/` (the default
local object store), `uploads/` (staging), `models/` (the converted default model),
`adapter-cache/` (per-engine download caches).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.adapters.registry import open_registry
from loraplex.adapters.storage import ObjectStore, open_store
from loraplex.api.context import ApiContext, Limits
from loraplex.api.metrics import Metrics
from loraplex.api.request_log import RequestLogs
from loraplex.config import (DEFAULT_MAX_ADAPTER_BYTES, DEFAULT_MAX_FINETUNES_PER_ACCOUNT, DEFAULT_MAX_PENDING,
                             EngineConfig, HttpConfig, MetricsConfig, RequestLogConfig, engine_config)
from loraplex.engine.async_engine import AsyncEngine
from loraplex.engine.engine import LLMEngine, resolve_model_dir
from loraplex.models.hf_config import ModelArgs
from loraplex.tokenizer import Tokenizer
from loraplex.training.database import open_training_db
from loraplex.training.files import FileStore
from loraplex.training.jobs import JobStore
from loraplex.training.log_writer import LogWriter
from loraplex.training.logs import LogStore, SqlLogStore

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
    # where accounts, tokens and finetunes live: a postgresql:// URL (one registry shared by every
    # server given it, on any machine), a SQLite file path (shared by servers on one machine, each
    # with its own data_dir), or None for registry.sqlite in data_dir
    registry: str | None = None
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


def open_request_logs(store: LogStore, metrics: Metrics) -> RequestLogs:
    """The request-log store's writer (started and stopped with the app) and settings cache."""
    writer = LogWriter(store, on_drop=lambda why: metrics.request_logs_dropped.labels(why).inc(),
                       on_written=metrics.request_logs_written.inc)
    return RequestLogs(store, writer)


def open_engine(opts: ServerOptions) -> tuple[LLMEngine, ObjectStore]:
    """Load the model into an engine (slow: seconds) and open the adapter object store (the data
    dir's `objects/` unless the engine config names one). Each scale-out replica calls this too."""
    store = open_adapter_store(opts)
    return LLMEngine(dataclasses.replace(opts.engine, data_dir=str(opts.data_dir)), adapter_store=store), store


def open_adapter_store(opts: ServerOptions) -> ObjectStore:
    """The object store of adapter files: the engine config's `storage`, else the data dir's `objects/`."""
    return open_store(opts.engine.lora.storage or (opts.data_dir / "objects").resolve().as_uri())


def build_context(opts: ServerOptions) -> ApiContext:
    """Load the model and open the registry and store (slow: seconds). The engine thread is
    started by the app's lifespan. Uploads a previous process was staging when it died are
    removed (one API process per data dir)."""
    engine, store = open_engine(opts)
    async_engine = AsyncEngine(engine, max_pending=opts.max_pending)
    return api_context(opts, async_engine, store, engine.tokenizer, engine.model_args, engine.max_model_len,
                       engine.adapters.stats)


def api_context(opts: ServerOptions, engine, store: ObjectStore, tokenizer: Tokenizer, model_args: ModelArgs,
                max_model_len: int, cache_stats: Callable[[], dict]) -> ApiContext:
    """The ApiContext serving `engine` (an AsyncEngine, or anything with its interface: the
    scale-out ingress passes serve/remote_engine.py's RemoteEngine); opens the registry, files,
    jobs and request logs, and removes the uploads a previous process was staging when it died."""
    shutil.rmtree(opts.data_dir / "uploads", ignore_errors=True)
    metrics = Metrics(engine.stats, lambda: engine.num_in_flight, cache_stats,
                      MetricsConfig(max_finetune_labels=opts.max_finetune_metric_labels))
    training = open_training_db(opts.data_dir, opts.registry)  # files, jobs, logs: beside the registry
    return ApiContext(
        engine=engine,
        registry=open_registry(opts.data_dir, opts.registry, opts.max_finetunes_per_account),
        store=store,
        tokenizer=tokenizer,
        model_args=model_args,
        model_name=opts.served_name,
        max_model_len=max_model_len,
        limits=Limits(max_adapter_bytes=opts.max_adapter_bytes, max_lora_rank=opts.engine.lora.max_lora_rank),
        metrics=metrics,
        upload_dir=opts.data_dir / "uploads",
        admin_token=opts.admin_token,
        metrics_token=opts.metrics_token,
        docs=opts.docs,
        files=FileStore(training, store),
        jobs=JobStore(training),
        model_dir=resolve_model_dir(opts.engine.model.model, opts.data_dir),
        request_logs=open_request_logs(SqlLogStore(training, opts.request_logs), metrics),
    )
