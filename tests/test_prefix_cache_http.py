"""Prefix caching as tenants meet it over HTTP: a prompt asked again by the same account, with
the same finetune, is served from the cache (the `/metrics` counters say so) with the same
answer; another account's identical prompt, or another finetune's, is computed again."""

from __future__ import annotations

import re

import httpx
import pytest

from api_server import LiveServer, server_options
from tiny_models import make_peft_adapter, make_tiny_model

MODEL = "@cf/test/tiny-llama"
PROMPT = "You are a terse assistant for the shipping department. Answer in one line. " * 3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import transformers

    model_dir = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama", model_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    adapter = tmp_path_factory.mktemp("adapter")
    make_peft_adapter(base, adapter, seed=3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    live = LiveServer.start(server_options(model_dir, tmp_path_factory.mktemp("data")))
    live.adapter_dir = adapter
    yield live
    live.stop()


def account(server, name: str):
    account_id, token = server.account(name)
    client = httpx.Client(base_url=f"{server.url}/client/v4/accounts/{account_id}/ai",
                          headers={"Authorization": f"Bearer {token}"}, timeout=60)
    finetune = client.post("/finetunes", json={"model": MODEL, "name": "shipping"}).json()["result"]["id"]
    for file_name in ("adapter_config.json", "adapter_model.safetensors"):
        with open(server.adapter_dir / file_name, "rb") as f:
            client.post(f"/finetunes/{finetune}/finetune-assets", data={"file_name": file_name},
                        files={"file": f}).raise_for_status()
    return client


def hit_tokens(server) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return float(re.search(r"^loraplex_prefix_cache_hit_tokens_total ([0-9.e+]+)$", text, re.M).group(1))


def ask(client, lora: str | None) -> str:
    body = {"prompt": PROMPT, "raw": True, "max_tokens": 8, "temperature": 0}
    if lora:
        body["lora"] = lora
    response = client.post(f"/run/{MODEL}", json=body)
    response.raise_for_status()
    return response.json()["result"]["response"]


def test_prefix_cache_is_per_account_and_per_adapter(server):
    alice, bob = account(server, "alice"), account(server, "bob")
    first = ask(alice, "shipping")
    before = hit_tokens(server)
    assert ask(alice, "shipping") == first
    assert hit_tokens(server) - before >= 64  # the prompt's full blocks (16 tokens each) came from the cache
    before = hit_tokens(server)
    assert ask(bob, "shipping") == first  # the same adapter bytes under bob's own finetune
    assert ask(alice, None) != "" and hit_tokens(server) == before  # neither bob nor the base model reused alice's
    server.wait_idle()  # and every KV block free: cached ones with no holder count as free
