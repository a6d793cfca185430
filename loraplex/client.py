"""The client commands (`loraplex finetunes create|list|get|delete`, `loraplex jobs …`, `loraplex run`),
in wrangler's spirit: they talk to a loraplex server over its Workers AI API, as any tenant would
(fine-tuning files go through the OpenAI dialect's `/v1/files`, the only route that takes them)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx

from loraplex.adapters.registry import Registry
from loraplex.config import PageConfig


class ClientError(Exception):
    """A refused call; the message is the server's (or says what is missing locally, or that
    nothing, or something other than loraplex, answers at the URL)."""


def _not_loraplex(url: str, response: httpx.Response) -> ClientError:
    kind = response.headers.get("content-type", "no content type").split(";")[0]
    return ClientError(f"{url} answered HTTP {response.status_code} ({kind}), not as a loraplex server does: "
                       "is --url / LORAPLEX_URL pointing at the right port?")


class Client:
    """Calls for one account. Every failure is a ClientError with a one-line message."""

    def __init__(self, url: str, account_id: str | None, token: str | None, timeout_s: float = 600):
        if not account_id or not token:
            raise ClientError("set LORAPLEX_ACCOUNT_ID and LORAPLEX_API_TOKEN (from `loraplex accounts create`)")
        self._url = url.rstrip("/")
        self._base = f"{self._url}/client/v4/accounts/{account_id}/ai"
        self._http = httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=timeout_s)

    def _unreachable(self, e: httpx.HTTPError) -> ClientError:
        if isinstance(e, httpx.ConnectError):
            return ClientError(f"no server answers at {self._url} (connection refused): start one with "
                               "`make serve`, or point --url / LORAPLEX_URL at it")
        return ClientError(f"cannot reach the server at {self._url}: {type(e).__name__}: {e}")

    def _call(self, method: str, path: str, **kwargs):
        """The `result` of a successful call; ClientError otherwise."""
        return self._envelope(method, path, **kwargs)["result"]

    def _envelope(self, method: str, path: str, **kwargs) -> dict:
        try:
            response = self._http.request(method, self._base + path, **kwargs)
        except httpx.HTTPError as e:
            raise self._unreachable(e) from None
        return self._checked(response, response.content)

    def _checked(self, response: httpx.Response, content: bytes) -> dict:
        """The Workers AI envelope of a successful answer; ClientError for a refusal, or for an
        answer that is not a Workers AI envelope at all (another service on the port)."""
        try:
            body = json.loads(content)
        except ValueError:
            body = None
        if not isinstance(body, dict) or "success" not in body or "errors" not in body:
            raise _not_loraplex(self._url, response)
        if response.status_code >= 400 or not body["success"]:
            errors = body.get("errors") or [{"code": "?", "message": f"HTTP {response.status_code}"}]
            raise ClientError("; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors))
        return body

    def create_finetune(self, model: str, name: str, folder: Path, description: str = "", public: bool = False) -> dict:
        """Create the finetune and send both files; returns it as the server has it afterwards.
        Refuses (before any call) unless both PEFT files are in `folder`. Run again after a
        refusal: an account's finetune of that name that is not ready yet (pending or invalid)
        for the same model is resumed, both files sent again (the server replaces them)."""
        missing = [f for f in Registry.REQUIRED_FILES if not (folder / f).is_file()]
        if missing:
            raise ClientError(f"{folder} is missing {', '.join(missing)}: a finetune needs "
                              + " and ".join(Registry.REQUIRED_FILES))
        finetune = self._unready_finetune(model, name)
        if finetune is None:
            finetune = self._call("POST", "/finetunes", json={"model": model, "name": name,
                                                               "description": description, "public": public})
        for file_name in Registry.REQUIRED_FILES:
            with open(folder / file_name, "rb") as f:
                try:
                    self._call("POST", f"/finetunes/{finetune['id']}/finetune-assets",
                               data={"file_name": file_name}, files={"file": (file_name, f)})
                except ClientError as e:
                    raise ClientError(f"{e}\nfinetune {name!r} (id {finetune['id']}) is not usable yet: fix "
                                      f"{folder / file_name} and run the same command again, or delete it with "
                                      f"`loraplex finetunes delete {finetune['id']}`") from None
        return self.get_finetune(finetune["id"])

    def _unready_finetune(self, model: str, name: str) -> dict | None:
        """The account's finetune `name` if it exists for `model` and is not ready, else None."""
        for finetune in self.list_finetunes():
            if finetune["name"] == name and finetune["model"] == model and finetune.get("state") != "ready":
                return finetune
        return None

    def get_finetune(self, id_or_name: str) -> dict:
        return self._call("GET", f"/finetunes/{quote(id_or_name, safe='')}")

    def delete_finetune(self, id_or_name: str) -> dict:
        return self._call("DELETE", f"/finetunes/{quote(id_or_name, safe='')}")

    def list_finetunes(self) -> list[dict]:
        """All of the account's finetunes, every page of the listing."""
        return self._all_pages("/finetunes")

    def _all_pages(self, path: str) -> list[dict]:
        items, page = [], 1
        while True:
            body = self._envelope("GET", path, params={"page": page, "per_page": PageConfig.max_per_page})
            items += body["result"]
            if not body["result"] or len(items) >= body["result_info"]["total_count"]:
                return items
            page += 1

    def upload_training_file(self, path: Path) -> dict:
        """POST the JSONL at `path` to `/v1/files` (purpose fine-tune); the file object (its `id`).
        The server's refusal names the bad lines."""
        with open(path, "rb") as f:
            try:
                response = self._http.post(f"{self._base}/v1/files", data={"purpose": "fine-tune"},
                                           files={"file": (path.name, f, "application/jsonl")})
            except httpx.HTTPError as e:
                raise self._unreachable(e) from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), dict):  # OpenAI's error shape
            raise ClientError(f"{body['error'].get('code')}: {body['error'].get('message')}")
        if response.status_code != 200 or not isinstance(body, dict) or body.get("object") != "file":
            raise _not_loraplex(self._url, response)
        return body

    def create_job(self, body: dict) -> dict:
        """A fine-tuning job; `body` as OpenAI's `POST /v1/fine_tuning/jobs` takes it."""
        return self._call("POST", "/fine-tuning/jobs", json=body)

    def list_jobs(self) -> list[dict]:
        return self._all_pages("/fine-tuning/jobs")

    def get_job(self, job_id: str) -> dict:
        return self._call("GET", f"/fine-tuning/jobs/{quote(job_id, safe='')}")

    def cancel_job(self, job_id: str) -> dict:
        return self._call("POST", f"/fine-tuning/jobs/{quote(job_id, safe='')}/cancel")

    def job_events(self, job_id: str) -> list[dict]:
        """All of the job's events, oldest first."""
        return self._all_pages(f"/fine-tuning/jobs/{quote(job_id, safe='')}/events")

    def run(self, model: str, prompt: str, lora: str | None = None, max_tokens: int = 256, raw: bool = False,
            temperature: float | None = None, seed: int | None = None, system: str | None = None) -> str:
        """The generated text (the server's sampling defaults for what is None)."""
        return self._call("POST", f"/run/{quote(model, safe='')}",
                          json=run_body(prompt, lora, max_tokens, raw, temperature, seed, system))["response"]

    def stream(self, model: str, prompt: str, lora: str | None = None, max_tokens: int = 256, raw: bool = False,
               temperature: float | None = None, seed: int | None = None,
               system: str | None = None) -> Iterator[str]:
        """The generated text as the server streams it (server-sent events), piece by piece."""
        body = run_body(prompt, lora, max_tokens, raw, temperature, seed, system) | {"stream": True}
        try:
            with self._http.stream("POST", f"{self._base}/run/{quote(model, safe='')}", json=body) as response:
                if response.status_code >= 400 or not response.headers.get("content-type", "").startswith(
                        "text/event-stream"):
                    self._checked(response, response.read())
                    raise _not_loraplex(self._url, response)
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[len("data: "):])
                    if "error" in event:
                        raise ClientError(f"{event['error'].get('code')}: {event['error'].get('message')}")
                    if event.get("response"):
                        yield event["response"]
        except httpx.HTTPError as e:
            raise self._unreachable(e) from None


def run_body(prompt: str, lora: str | None, max_tokens: int, raw: bool, temperature: float | None,
             seed: int | None, system: str | None) -> dict:
    """The JSON of POST …/ai/run/{model}: `prompt`, or `messages` when there is a system prompt."""
    if system is not None and raw:
        raise ClientError("--system needs the chat template: it cannot go with --raw")
    body: dict = {"max_tokens": max_tokens}
    if system is not None:
        body["messages"] = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    else:
        body |= {"prompt": prompt, "raw": raw}
    optional = {"lora": lora, "temperature": temperature, "seed": seed}
    return body | {k: v for k, v in optional.items() if v is not None}


def stop_process(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM `proc` if it still runs, wait up to `timeout_s`, then SIGKILL; returns once it is reaped."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_until_healthy(url: str, proc: subprocess.Popen | None = None, timeout_s: float = 60.0,
                       log_path: Path | None = None) -> None:
    """Poll `url`/healthz until it answers 200. RuntimeError, with the tail of `log_path`, when the
    server process `proc` exits first or `timeout_s` passes."""

    def failure(what: str) -> RuntimeError:
        tail = log_path.read_text(errors="replace")[-3000:] if log_path is not None and log_path.exists() else ""
        return RuntimeError(f"the server at {url} {what}" + (f":\n{tail}" if tail else ""))

    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise failure(f"exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise failure(f"did not answer within {timeout_s:.0f} s")
        time.sleep(0.1)


def print_json(value) -> None:
    json.dump(value, sys.stdout)
    sys.stdout.write("\n")
