"""ApiContext: what every route needs (engine, registry, store, tokenizer, limits), and the few
operations shared by both dialects: model names, finetune → adapter, prompt → token ids.

Blocking work (SQLite, object store) runs in worker threads (`to_thread`), never on the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from starlette.concurrency import run_in_threadpool as to_thread

from loraplex.adapters.cache import CONFIG_FILE, WEIGHTS_FILE, RemoteSource
from loraplex.adapters.registry import Finetune, Registry
from loraplex.adapters.storage import ObjectStore
from loraplex.api.errors import ApiError, invalid
from loraplex.api.metrics import Metrics
from loraplex.api.request_log import RequestLogs
from loraplex.config import DEFAULT_MAX_ADAPTER_BYTES, DEFAULT_MAX_LORA_RANK
from loraplex.engine.async_engine import AsyncEngine
from loraplex.lora.adapter import MAX_CONFIG_BYTES
from loraplex.models.hf_config import ModelArgs
from loraplex.tokenizer import Tokenizer
from loraplex.training.files import FileStore
from loraplex.training.jobs import JobStore

MULTIPART_FRAMING_BYTES = 2**16  # an uploaded file's body limit: the file plus this


@dataclass
class Limits:
    max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES  # adapter_model.safetensors
    max_config_bytes: int = MAX_CONFIG_BYTES  # adapter_config.json
    max_json_body_bytes: int = 4 * 2**20
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK

    @property
    def max_upload_body_bytes(self) -> int:
        return self.max_adapter_bytes + MULTIPART_FRAMING_BYTES


@dataclass
class ApiContext:
    engine: AsyncEngine
    registry: Registry
    store: ObjectStore
    tokenizer: Tokenizer
    model_args: ModelArgs
    model_name: str
    max_model_len: int
    limits: Limits
    metrics: Metrics
    upload_dir: Path  # staging folder for uploads, on the data dir's disk
    admin_token: str | None = None  # the operator routes' bearer token; None: no operator routes
    metrics_token: str | None = None  # /metrics wants this bearer token; None: /metrics is open
    docs: bool = True  # serve /docs, /redoc and /openapi.json
    files: FileStore | None = None  # fine-tuning files (training/files.py)
    jobs: JobStore | None = None  # fine-tuning jobs (training/jobs.py)
    model_dir: Path | None = None  # the base model's folder (the trainer loads it)
    request_logs: RequestLogs | None = None  # tenants' request logs (api/request_log.py); None: none kept

    @property
    def served_names(self) -> tuple[str, str]:
        """The base model's name and its `-lora` alias; both accept `lora`."""
        return self.model_name, f"{self.model_name}-lora"

    def check_model(self, name: str) -> None:
        if name not in self.served_names:
            raise ApiError(5007, f"no such model: {name[:200]!r}; this server serves " + ", ".join(self.served_names))

    async def adapter_for(self, account_id: str, lora: str | None) -> str | None:
        """The engine's adapter name for the finetune `lora` (id or name) as seen by `account_id`,
        registered with the engine (fetched on first use); None for the base model.
        3037 unknown or another account's private finetune, 3039 missing files."""
        if lora is None:
            return None
        finetune: Finetune = await to_thread(self.registry.resolve_usable, account_id, lora)
        if finetune.model not in self.served_names:
            raise invalid(f"finetune {finetune.name!r} is for model {finetune.model!r}, not {self.model_name!r}")
        source = RemoteSource(finetune.assets[CONFIG_FILE].object_key, finetune.assets[WEIGHTS_FILE].object_key)
        await self.engine.ensure_lora(finetune.id, source)
        return finetune.id

    async def encode_prompt(self, prompt: str, raw: bool) -> list[int]:
        """`raw`: the text as is; otherwise one user turn through the chat template. Tokenized in
        a worker thread, after the cheap size check (`check_prompt_chars`)."""
        self.check_prompt_chars(len(prompt))
        if raw:
            return await to_thread(self.tokenizer.encode, prompt)
        return await self.encode_chat([{"role": "user", "content": prompt}])

    async def encode_chat(self, messages: list[dict]) -> list[int]:
        """The conversation through the chat template, rendered and tokenized in a worker thread
        after the cheap size check (`check_prompt_chars`)."""
        self.check_prompt_chars(sum(len(m["content"]) for m in messages))
        return await to_thread(self._encode_chat, messages)

    def _encode_chat(self, messages: list[dict]) -> list[int]:
        try:
            return self.tokenizer.encode_chat(messages)
        except ValueError as e:  # the template refused the conversation (raise_exception)
            raise invalid(f"messages: {str(e)[:300]}") from None

    def check_prompt_chars(self, num_chars: int) -> None:
        """Refuse, before tokenizing, a prompt that cannot fit the context window whatever its
        tokens: more characters than context × the longest token's characters."""
        limit = self.max_model_len * self.tokenizer.max_token_chars
        if num_chars >= limit:
            raise invalid(f"the prompt has {num_chars} characters: more than the context window of "
                          f"{self.max_model_len} tokens can hold (at most {limit} characters)")

    def check_max_tokens(self, max_tokens: int) -> None:
        if max_tokens >= self.max_model_len:
            raise invalid(f"max_tokens is {max_tokens}; the context window is {self.max_model_len} tokens")
