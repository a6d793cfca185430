"""What the upload tests share: a tenant's httpx client on a live server, the error-envelope
check, the identity of the keep-alive connection a response came on, and a watcher of the
server's ERROR logs (tracebacks)."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class Tenant:
    """One account's client. Every call goes through the same httpx.Client (one keep-alive
    connection at a time), so `connection()` tells whether the server kept it open."""

    client: httpx.Client
    account_id: str
    model: str

    @classmethod
    def open(cls, server, name: str, model: str) -> Tenant:
        account_id, token = server.account(name)
        client = httpx.Client(base_url=f"{server.url}/client/v4/accounts/{account_id}/ai",
                              headers={"Authorization": f"Bearer {token}"}, timeout=120,
                              limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
        return cls(client, account_id, model)

    def create(self, name: str, **fields) -> httpx.Response:
        return self.client.post("/finetunes", json={"model": self.model, "name": name} | fields)

    def create_id(self, name: str, **fields) -> str:
        response = self.create(name, **fields)
        assert response.status_code == 200, response.text
        return response.json()["result"]["id"]

    def send(self, finetune: str, file_name: str, data: bytes) -> httpx.Response:
        return self.client.post(f"/finetunes/{finetune}/finetune-assets", data={"file_name": file_name},
                                files={"file": (file_name, data)})

    def send_folder(self, finetune: str, folder: Path) -> None:
        for file_name in (CONFIG, WEIGHTS):
            response = self.send(finetune, file_name, (folder / file_name).read_bytes())
            assert response.status_code == 200, response.text

    def get(self, finetune: str) -> dict:
        response = self.client.get(f"/finetunes/{finetune}")
        assert response.status_code == 200, response.text
        return response.json()["result"]

    def run(self, lora: str | None, prompt: str = "Hello", max_tokens: int = 8) -> httpx.Response:
        body = {"prompt": prompt, "raw": True, "max_tokens": max_tokens, "temperature": 0}
        return self.client.post(f"/run/{self.model}", json=body | ({"lora": lora} if lora else {}))

    def close(self) -> None:
        self.client.close()


def connection(response: httpx.Response) -> tuple:
    """The client-side address of the TCP connection the response came on."""
    return response.extensions["network_stream"].get_extra_info("client_addr")


def assert_error(response: httpx.Response, status: int, code: int, *needles: str) -> str:
    """The Workers AI error envelope with this status and code; returns its message, which must
    contain every needle."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is False and body["result"] is None, body
    assert body["errors"][0]["code"] == code, body
    message = body["errors"][0]["message"]
    for needle in needles:
        assert needle in message, message
    assert "Traceback" not in message and "NoneType" not in message, message
    return message


class ErrorLog(logging.Handler):
    """Collects ERROR records of the server's loggers (tracebacks of unhandled exceptions)."""

    LOGGERS = ("uvicorn.error", "loraplex")

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @contextmanager
    def watching(self):
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)
        try:
            yield self
        finally:
            for name in self.LOGGERS:
                logging.getLogger(name).removeHandler(self)

    def messages(self) -> list[str]:
        return [f"{r.getMessage()} ({r.exc_info[0].__name__ if r.exc_info else ''})" for r in self.records]


MODEL = "@cf/test/tiny-llama"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_model_and_adapter(tmp_path_factory, **lora) -> tuple[Path, Path]:
    """A tiny random Llama folder and one PEFT adapter for it (rank 4, every linear by default)."""
    from tiny_models import make_peft_adapter, make_tiny_model

    model_dir = tmp_path_factory.mktemp("tiny-llama")
    base = make_tiny_model("llama", model_dir)
    adapter_dir = tmp_path_factory.mktemp("adapter")
    make_peft_adapter(base, adapter_dir, seed=1, **({"r": 4, "lora_alpha": 8, "target_modules": ALL_LINEAR} | lora))
    return model_dir, adapter_dir
