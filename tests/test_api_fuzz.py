"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis: valid and invalid bodies, path
and query values), and tenant isolation checked route by route from the same schema.

Properties: no 5xx, no traceback in any response, every refusal in the documented error shape;
every route, called with another account's valid token, is refused with 403 / 10000.
Deeper run: `pytest tests/test_api_fuzz.py --hypothesis-profile=api-deep`.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from api_server import LiveServer, server_options
from loraplex.api.app import create_app
from tiny_models import make_peft_adapter, make_tiny_model

settings.register_profile("api-deep", max_examples=500)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("fuzz-model")
    base = make_tiny_model("llama", model_dir)
    live = LiveServer.start(server_options(model_dir, tmp_path_factory.mktemp("fuzz-data")))
    account_id, token = live.account("fuzzer")
    adapter = tmp_path_factory.mktemp("adapter")
    make_peft_adapter(base, adapter, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    with httpx.Client(base_url=f"{live.url}/client/v4/accounts/{account_id}/ai",
                      headers={"Authorization": f"Bearer {token}"}) as client:
        finetune = client.post("/finetunes", json={"model": "@cf/test/tiny-llama", "name": "ft"}).json()["result"]
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            client.post(f"/finetunes/{finetune['id']}/finetune-assets", data={"file_name": name},
                        files={"file": (name, (adapter / name).read_bytes())}).raise_for_status()
    live.tenant = (account_id, token, finetune["id"])
    yield live
    live.stop()


# The OpenAPI document does not depend on the model: built from an app with no context yet
# (schemathesis collects one test per operation at import time).
OPENAPI = create_app(None).openapi()
schema = schemathesis.openapi.from_dict(OPENAPI)


def assert_clean(response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    assert "Traceback" not in response.text and 'File "' not in response.text
    content_type = "".join(response.headers.get("content-type", []))  # schemathesis: a list per header
    if response.status_code >= 400 and content_type.startswith("application/json"):
        body = response.json()
        if "error" in body:  # the OpenAI dialect
            assert isinstance(body["error"]["message"], str) and isinstance(body["error"]["code"], int)
        else:
            assert body["success"] is False and isinstance(body["errors"][0]["code"], int), body


@schema.parametrize()
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, fuzz_server):
    account_id, token, finetune_id = fuzz_server.tenant
    if "account_id" in (case.path_parameters or {}):
        case.path_parameters["account_id"] = account_id  # past auth, into the handlers
    if case.method == "DELETE" and "finetune_id" in case.path_parameters:
        case.path_parameters["finetune_id"] = "no-such-finetune"  # keep the fixture's finetune
    response = case.call(base_url=fuzz_server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert_clean(response)
    fuzz_server.wait_idle(30)


def test_every_account_route_refuses_other_tenants(fuzz_server):
    account_id, _, finetune_id = fuzz_server.tenant
    _, other_token = fuzz_server.account("intruder")
    assert fuzz_server.app.openapi() == OPENAPI
    routes = [(method.upper(), path) for path, ops in OPENAPI["paths"].items() for method in ops
              if "{account_id}" in path]
    assert len(routes) >= 11
    values = {"account_id": account_id, "finetune_id": finetune_id, "model_name": "@cf/test/tiny-llama",
              "file_id": "file-of-nobody", "job_id": "ftjob-of-nobody", "log_id": "log-of-nobody"}
    with httpx.Client(base_url=fuzz_server.url, headers={"Authorization": f"Bearer {other_token}"}) as client:
        for method, path in routes:
            response = client.request(method, path.format(**values), json={"prompt": "x"})
            assert response.status_code == 403, (method, path, response.text)
            body = response.json()
            code = body["error"]["code"] if "error" in body else body["errors"][0]["code"]
            assert code == 10000, (method, path, body)
    assert fuzz_server.ctx.registry.get_finetune(account_id, finetune_id).state == "ready"
