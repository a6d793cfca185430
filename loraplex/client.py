"""The client commands (`loraplex finetunes create|list|get|delete`, `loraplex run`), in wrangler's spirit:
they talk to a loraplex server over its Workers AI API, as any tenant would."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import httpx

from loraplex.adapters.registry import Registry


class ClientError(Exception):
    """A refused call; the message is the server's (or says what is missing locally)."""


class Client:
    def __init__(self, url: str, account_id: str | None, token: str | None, timeout_s: float = 600):
        if not account_id or not token:
            raise ClientError("set LORAPLEX_ACCOUNT_ID and LORAPLEX_API_TOKEN (from `loraplex accounts create`)")
        self._base = f"{url.rstrip('/')}/client/v4/accounts/{account_id}/ai"
        self._http = httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=timeout_s)

    def _call(self, method: str, path: str, **kwargs):
        try:
            response = self._http.request(method, self._base + path, **kwargs)
        except httpx.HTTPError as e:
            raise ClientError(f"cannot reach the server: {e}") from None
        try:
            body = response.json()
        except ValueError:
            raise ClientError(f"HTTP {response.status_code}: {response.text[:300]}") from None
        if response.status_code >= 400 or not body.get("success", False):
            errors = body.get("errors") or [{"code": "?", "message": response.text[:300]}]
            raise ClientError("; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors))
        return body["result"]

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
        return self._call("GET", "/finetunes")

    def run(self, model: str, prompt: str, lora: str | None = None, max_tokens: int = 256, raw: bool = False) -> str:
        body = {"prompt": prompt, "max_tokens": max_tokens, "raw": raw}
        if lora:
            body["lora"] = lora
        return self._call("POST", f"/run/{quote(model, safe='')}", json=body)["response"]


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
