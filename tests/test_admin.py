"""The operator's view over HTTP: `GET /admin/adapters` (which adapter sits in which slot, host
memory, local disk; loads in flight), guarded by the admin token and absent without one; and the
per-finetune Prometheus counters, with a bounded label set and no tenant names."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from cloudflare import Cloudflare

from api_server import LiveServer, server_options
from tiny_models import make_peft_adapter

MODEL = "@cf/test/tiny-llama"
ADMIN = "operator-secret-token"


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    root = tmp_path_factory.mktemp("adapters")
    for seed, name in enumerate(("alpha", "beta", "gamma")):
        make_peft_adapter(base, root / name, seed=seed, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return root


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """One slot; labels for one finetune only (the next ones count as "other")."""
    live = LiveServer.start(server_options(model_dir, tmp_path_factory.mktemp("data"), max_loras=1,
                                           admin_token=ADMIN, max_finetune_metric_labels=1))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def tenant(server, adapters):
    """An account named "acme-corp" with finetunes alpha, beta and gamma; name → id."""
    account_id, token = server.account("acme-corp")
    cf = Cloudflare(api_token=token, base_url=f"{server.url}/client/v4", max_retries=0)
    ids = {}
    for name in ("alpha", "beta", "gamma"):
        ids[name] = cf.ai.finetunes.create(account_id=account_id, model=MODEL, name=name).id
        for file_name in ("adapter_config.json", "adapter_model.safetensors"):
            with open(adapters / name / file_name, "rb") as f:
                cf.ai.finetunes.assets.create(ids[name], account_id=account_id, file=f, file_name=file_name)
    return account_id, token, ids


def run(server, tenant, lora: str | None, max_tokens: int = 3) -> dict:
    account_id, token, _ = tenant
    body = {"prompt": "hello", "max_tokens": max_tokens} | ({"lora": lora} if lora else {})
    response = httpx.post(f"{server.url}/client/v4/accounts/{account_id}/ai/run/{MODEL}", json=body,
                          headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["result"]["usage"]


def residency(server, token: str | None = ADMIN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{server.url}/admin/adapters", headers=headers, timeout=30)


def test_the_admin_token_guards_the_route(server, tenant):
    assert residency(server, None).status_code == 401
    assert residency(server, "wrong").status_code == 403
    refused = residency(server, tenant[1])  # a tenant's own API token is no admin token
    assert refused.status_code == 403 and refused.json()["errors"][0]["code"] == 10000


def test_without_an_admin_token_there_is_no_admin_route(model_dir, tmp_path):
    live = LiveServer.start(server_options(model_dir, tmp_path))
    try:
        response = residency(live)
        assert response.status_code == 404 and response.json()["errors"][0]["code"] == 7000
    finally:
        live.stop()


def test_residency_per_tier(server, tenant):
    ids = tenant[2]
    run(server, tenant, "alpha")
    run(server, tenant, "beta")  # one slot: beta displaces alpha there; both stay in host memory and on disk
    server.wait_idle()
    view = residency(server).json()
    slots = view["slots"]
    assert (slots["total"], slots["occupied"]) == (1, 1) and slots["bytes"] == slots["bytes_per_slot"] > 0
    assert slots["residents"] == [{"slot": 0, "adapter": ids["beta"], "loading": False, "holders": 0}]
    host = {a["adapter"]: a for a in view["host"]["adapters"]}
    disk = {a["adapter"]: a for a in view["disk"]["adapters"]}
    assert set(host) == set(disk) == {ids["alpha"], ids["beta"]}  # gamma was never used: remote only
    assert view["host"]["bytes"] == sum(a["bytes"] for a in host.values()) > 0
    assert view["disk"]["bytes"] == sum(a["bytes"] for a in disk.values()) > 0
    assert all(a["pins"] == 0 for a in host.values())
    assert view["host"]["budget_bytes"] > 0 and view["disk"]["budget_bytes"] > 0
    assert view["loading"] == [] and view["errored"] == []


def test_loads_in_flight_are_shown(server, tenant):
    """A download held back in the store shows as loading; released, the request completes."""
    ids = tenant[2]
    cache = server.ctx.engine.engine.adapters.tiers
    release = threading.Event()
    fetch_to = cache._store.fetch_to

    def held_fetch(key, path):
        release.wait(60)
        return fetch_to(key, path)

    cache._store.fetch_to = held_fetch
    result = {}
    request = threading.Thread(target=lambda: result.update(run(server, tenant, "gamma")))
    try:
        request.start()
        deadline = time.monotonic() + 30
        while not (loading := residency(server).json()["loading"]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert loading == [{"adapter": ids["gamma"], "state": "downloading"}]
    finally:
        release.set()
        cache._store.fetch_to = fetch_to
        request.join(60)
    assert result["completion_tokens"] == 3
    assert residency(server).json()["loading"] == []


def test_per_finetune_counters_are_bounded_and_name_no_tenant(server, tenant):
    """The server labels one finetune id at most (the first it saw); the rest count as "other"."""
    ids = tenant[2]
    before = finetune_counters(server)
    usages = {lora: run(server, tenant, lora, max_tokens=2) for lora in ("alpha", "beta", None)}
    after = finetune_counters(server)
    labels = {label for (_, label) in after}
    named = labels - {"base", "other"}
    assert len(named) == 1 and named <= set(ids.values()) and "other" in labels

    def delta(metric: str, *which: str) -> float:
        return sum(after.get((metric, label), 0.0) - before.get((metric, label), 0.0) for label in which)

    finetuned = (*named, "other")
    assert delta("loraplex_finetune_requests_total", *finetuned) == 2
    assert delta("loraplex_finetune_requests_total", "base") == 1
    assert delta("loraplex_finetune_generation_tokens_total", *finetuned) == 4
    assert delta("loraplex_finetune_prompt_tokens_total", *finetuned) == (usages["alpha"]["prompt_tokens"]
                                                                           + usages["beta"]["prompt_tokens"])
    assert delta("loraplex_finetune_prompt_tokens_total", "base") == usages[None]["prompt_tokens"]
    text = httpx.get(f"{server.url}/metrics").text
    assert "acme-corp" not in text and tenant[0] not in text and "alpha" not in text


def finetune_counters(server) -> dict[tuple[str, str], float]:
    out = {}
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith("loraplex_finetune_") and "_total{" in line:
            name, rest = line.split("{", 1)
            out[(name, rest.split('"')[1])] = float(line.split()[-1])
    return out


def test_serve_reads_the_admin_token_from_the_environment(tmp_path, monkeypatch):
    from loraplex.cli import _parser, _server_options

    args = _parser().parse_args(["serve", "--data-dir", str(tmp_path)])
    monkeypatch.delenv("LORAPLEX_ADMIN_TOKEN", raising=False)
    assert _server_options(args).admin_token is None
    monkeypatch.setenv("LORAPLEX_ADMIN_TOKEN", ADMIN)
    assert _server_options(args).admin_token == ADMIN
