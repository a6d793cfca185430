"""A tenant of a live test server as the request-logs tests see it: the logs routes through
httpx, generation through the real clients (Cloudflare SDK for Workers AI, OpenAI SDK)."""

from __future__ import annotations

import httpx
import openai
from cloudflare import Cloudflare

from tests.api_server import LiveServer

MODEL = "@cf/test/tiny-llama"
ON, OFF = {"cf-aig-collect-log": "true"}, {"cf-aig-collect-log": "false"}


class Tenant:
    """One account, seen through httpx (the logs routes), the Cloudflare SDK and the OpenAI SDK."""

    def __init__(self, server: LiveServer, name: str):
        self.server = server
        self.id, self.token = server.account(name)
        self.base = f"{server.url}/client/v4/accounts/{self.id}/ai"
        self.cf = Cloudflare(api_token=self.token, base_url=f"{server.url}/client/v4", max_retries=0)
        self.oai = openai.OpenAI(api_key=self.token, base_url=f"{self.base}/v1", max_retries=0)

    def call(self, method: str, path: str, **kwargs) -> httpx.Response:
        return httpx.request(method, f"{self.base}/logs{path}", headers={"Authorization": f"Bearer {self.token}"},
                             **kwargs)

    def ok(self, method: str, path: str, **kwargs):
        response = self.call(method, path, **kwargs)
        assert response.status_code == 200, response.text
        return response.json()["result"]

    def logs(self, **params) -> list[dict]:
        self.server.ctx.request_logs.writer.drain()
        return self.ok("GET", "", params=params)

    def run(self, prompt: str, headers: dict | None = None) -> str:
        return self.cf.ai.run(MODEL, account_id=self.id, prompt=prompt, max_tokens=4, temperature=0,
                              extra_headers=headers)["response"]

    def chat(self, content: str, headers: dict | None = None, model: str = MODEL, max_tokens: int = 4):
        return self.oai.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                                max_tokens=max_tokens, temperature=0, extra_headers=headers)


def refused(response: httpx.Response, status: int, needle: str) -> None:
    """`response` is a refusal in the Workers AI envelope with this status and `needle` in its message."""
    body = response.json()
    assert response.status_code == status, response.text
    assert body["success"] is False and body["result"] is None and needle in body["errors"][0]["message"]
