"""The HTTP API against a live server on loopback, driven by the real Cloudflare and OpenAI SDKs
(and plain httpx for the error paths): outputs equal the offline LLM with the same adapter."""

from __future__ import annotations

import argparse

import json
import time

import httpx
import pytest
from cloudflare import Cloudflare
from openai import OpenAI

from api_server import LiveServer, server_options
from loraplex import LLM, SamplingParams
from loraplex.config import DEFAULT_MAX_FINETUNES_PER_ACCOUNT
from tiny_models import make_peft_adapter

MODEL = "@cf/test/tiny-llama"  # slashes: the Cloudflare SDK sends them %2F-encoded
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    """name → PEFT folder: two servable adapters and one of rank 40 (over the server's default limit of 32)."""
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    root = tmp_path_factory.mktemp("adapters")
    specs = {"all-linear": dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR),
             "qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
             "rank40": dict(r=40, lora_alpha=16, target_modules=["q_proj"])}
    for seed, (name, spec) in enumerate(specs.items()):
        make_peft_adapter(base, root / name, seed=seed, **spec)
    return {name: root / name for name in specs}


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    live = LiveServer.start(server_options(model_dir, tmp_path_factory.mktemp("data")))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def offline(model_dir, adapters):
    llm = LLM(str(model_dir), dtype="float32", device="cpu", max_loras=2, kv_cache_memory=16 << 20)
    for name in ("all-linear", "qv"):
        llm.add_lora(name, adapters[name])
    return llm


@pytest.fixture(scope="module")
def alice(server):
    return server.account("alice")


@pytest.fixture(scope="module")
def bob(server):
    return server.account("bob")


def cloudflare(server, token) -> Cloudflare:
    return Cloudflare(api_token=token, base_url=f"{server.url}/client/v4", max_retries=0)


def http(server, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=f"{server.url}/client/v4", headers=headers, timeout=60)


def upload(server, account, name: str, folder, public: bool = False) -> str:
    """Create a finetune and upload both files with the Cloudflare SDK; returns its id."""
    account_id, token = account
    cf = cloudflare(server, token)
    finetune = cf.ai.finetunes.create(account_id=account_id, model=MODEL, name=name, public=public)
    for file_name in ("adapter_config.json", "adapter_model.safetensors"):
        with open(folder / file_name, "rb") as f:
            result = cf.ai.finetunes.assets.create(finetune.id, account_id=account_id, file=f, file_name=file_name)
        assert result.success
    return finetune.id


@pytest.fixture(scope="module")
def alice_finetunes(server, alice, adapters):
    return {name: upload(server, alice, name, adapters[name]) for name in ("all-linear", "qv")}


def assert_error(response: httpx.Response, status: int, code: int, needle: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is False and body["result"] is None
    assert body["errors"][0]["code"] == code, body
    assert needle in body["errors"][0]["message"]


# --- Workers AI dialect through the Cloudflare SDK --------------------------------------------

def test_cloudflare_sdk_run_matches_offline_llm(server, alice, alice_finetunes, offline):
    account_id, token = alice
    cf = cloudflare(server, token)
    params = SamplingParams(max_tokens=12, temperature=0.0)
    for lora in (None, "all-linear", "qv"):
        kwargs = {"lora": lora} if lora else {}
        result = cf.ai.run(MODEL, account_id=account_id, prompt=PROMPT, raw=True, max_tokens=12, temperature=0,
                           **kwargs)
        expected = offline.generate(PROMPT, params, lora=lora)[0]
        assert result["response"] == expected.text
        assert result["usage"] == {"prompt_tokens": len(expected.prompt_token_ids), "completion_tokens": 12,
                                   "total_tokens": len(expected.prompt_token_ids) + 12}
    texts = {lora: cf.ai.run(MODEL, account_id=account_id, prompt=PROMPT, raw=True, max_tokens=12, temperature=0,
                             **({"lora": lora} if lora else {}))["response"] for lora in (None, "qv")}
    assert texts[None] != texts["qv"]  # the adapter really changes the output


def test_finetune_by_id_alias_model_and_messages(server, alice, alice_finetunes, offline):
    account_id, token = alice
    cf = cloudflare(server, token)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    result = cf.ai.run(f"{MODEL}-lora", account_id=account_id, messages=messages, max_tokens=8, temperature=0,
                       lora=alice_finetunes["qv"])
    expected = offline.chat(messages, SamplingParams(max_tokens=8, temperature=0), lora="qv")[0]
    assert result["response"] == expected.text
    # a prompt without `raw` goes through the chat template as one user turn
    result = cf.ai.run(MODEL, account_id=account_id, prompt="Hi there", max_tokens=8, temperature=0)
    assert result["response"] == offline.chat([{"role": "user", "content": "Hi there"}],
                                              SamplingParams(max_tokens=8, temperature=0))[0].text


def test_finetune_listing_and_fields(server, alice, alice_finetunes):
    account_id, token = alice
    with http(server, token) as client:
        listed = client.get(f"/accounts/{account_id}/ai/finetunes").json()["result"]
        assert {f["name"] for f in listed} == {"all-linear", "qv"}
        for f in listed:
            assert set(f) == {"id", "name", "model", "description", "public", "created_at", "modified_at", "state",
                              "state_reason"}
            assert f["model"] == MODEL and f["public"] is False and f["state"] == "ready"
        one = client.get(f"/accounts/{account_id}/ai/finetunes/qv").json()["result"]
        assert one["id"] == alice_finetunes["qv"] and one["state"] == "ready"
        assert {a["file_name"] for a in one["assets"]} == {"adapter_config.json", "adapter_model.safetensors"}
        models = client.get(f"/accounts/{account_id}/ai/models/search").json()["result"]
        assert [m["name"] for m in models] == [MODEL, f"{MODEL}-lora"]
        assert all({"property_id": "lora", "value": "true"} in m["properties"] for m in models)


def test_streaming_run(server, alice, alice_finetunes, offline):
    account_id, token = alice
    body = {"prompt": PROMPT, "raw": True, "max_tokens": 10, "temperature": 0, "stream": True, "lora": "all-linear"}
    with http(server, token) as client, client.stream(
            "POST", f"/accounts/{account_id}/ai/run/{MODEL}", content=json.dumps(body),
            headers={"Content-Type": "text/plain"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    text = "".join(e["response"] for e in events)
    assert text == offline.generate(PROMPT, SamplingParams(max_tokens=10, temperature=0), lora="all-linear")[0].text
    assert events[-1]["usage"]["completion_tokens"] == 10


# --- OpenAI dialect through the OpenAI SDK ----------------------------------------------------

def test_openai_sdk_chat_matches_offline_llm(server, alice, alice_finetunes, offline):
    account_id, token = alice
    client = OpenAI(api_key=token, base_url=f"{server.url}/client/v4/accounts/{account_id}/ai/v1", max_retries=0)
    messages = [{"role": "user", "content": "Tell me a story"}]
    expected = offline.chat(messages, SamplingParams(max_tokens=10, temperature=0), lora="qv")[0]
    reply = client.chat.completions.create(model=f"{MODEL}:qv", messages=messages, max_tokens=10, temperature=0)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 10 and reply.usage.prompt_tokens == len(expected.prompt_token_ids)

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"lora": "qv"})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10

    base = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert base.choices[0].message.content == offline.chat(
        messages, SamplingParams(max_tokens=10, temperature=0))[0].text


def test_openai_sdk_completions_and_models(server, alice, alice_finetunes, offline):
    account_id, token = alice
    client = OpenAI(api_key=token, base_url=f"{server.url}/client/v4/accounts/{account_id}/ai/v1", max_retries=0)
    reply = client.completions.create(model=f"{MODEL}:all-linear", prompt=PROMPT, max_tokens=8, temperature=0)
    expected = offline.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0), lora="all-linear")[0]
    assert reply.choices[0].text == expected.text
    streamed = client.completions.create(model=f"{MODEL}:all-linear", prompt=PROMPT, max_tokens=8, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected.text
    ids = {m.id for m in client.models.list()}
    assert {MODEL, f"{MODEL}-lora", f"{MODEL}:qv", f"{MODEL}:all-linear"} <= ids


def test_openai_errors_in_openai_shape(server, alice):
    account_id, token = alice
    client = OpenAI(api_key=token, base_url=f"{server.url}/client/v4/accounts/{account_id}/ai/v1", max_retries=0)
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == 5007
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=f"{MODEL}:no-such-finetune", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        OpenAI(api_key="wrong", base_url=client.base_url, max_retries=0).models.list()


# --- errors, limits, isolation ----------------------------------------------------------------

def test_auth_errors(server, alice, bob):
    account_id, token = alice
    path = f"/accounts/{account_id}/ai/run/{MODEL}"
    with http(server, None) as anonymous:
        assert_error(anonymous.post(path, json={"prompt": "x"}), 401, 10000)
    with http(server, "not-a-token") as stranger:
        assert_error(stranger.post(path, json={"prompt": "x"}), 401, 10000)
    with http(server, bob[1]) as other:  # bob's valid token on alice's path
        assert_error(other.post(path, json={"prompt": "x"}), 403, 10000)
        assert_error(other.get(f"/accounts/{account_id}/ai/finetunes"), 403, 10000)


@pytest.mark.parametrize("body, needle", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "exactly one"),
    ({}, "exactly one"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**6}, "context window"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
])
def test_invalid_input(server, alice, body, needle):
    account_id, token = alice
    with http(server, token) as client:
        assert_error(client.post(f"/accounts/{account_id}/ai/run/{MODEL}", json=body), 400, 5004, needle)


def test_unknown_model_bad_json_and_long_prompt(server, alice):
    account_id, token = alice
    with http(server, token) as client:
        assert_error(client.post(f"/accounts/{account_id}/ai/run/@cf/meta/nope", json={"prompt": "x"}), 400, 5007)
        assert_error(client.post(f"/accounts/{account_id}/ai/run/{MODEL}", content=b"{not json"), 400, 5004, "JSON")
        deep = "[" * 100_000 + "]" * 100_000
        assert_error(client.post(f"/accounts/{account_id}/ai/run/{MODEL}", content=deep), 400, 5004)
        too_long = {"prompt": "a" * 600, "raw": True}  # the tiny model's context window is 512 tokens
        assert_error(client.post(f"/accounts/{account_id}/ai/run/{MODEL}", json=too_long), 400, 5004, "context")
        assert client.get("/no/such/route").status_code == 404


def test_finetune_errors(server, adapters):
    account_id, token = server.account("errors")
    base = f"/accounts/{account_id}/ai/finetunes"
    with http(server, token) as client:
        run = f"/accounts/{account_id}/ai/run/{MODEL}"
        assert_error(client.post(run, json={"prompt": "x", "lora": "missing"}), 404, 3037)
        assert_error(client.post(base, json={"model": "other-model", "name": "x"}), 400, 5007)
        assert_error(client.post(base, json={"model": MODEL, "name": "bad/name"}), 400, 5004)
        half = client.post(base, json={"model": MODEL, "name": "half"}).json()["result"]
        files = {"file": ("adapter_config.json", (adapters["qv"] / "adapter_config.json").read_bytes())}
        ok = client.post(f"{base}/{half['id']}/finetune-assets", data={"file_name": "adapter_config.json"}, files=files)
        assert ok.status_code == 200 and ok.json()["success"] is True
        again = client.post(f"{base}/{half['id']}/finetune-assets", data={"file_name": "adapter_config.json"},
                            files=files)  # not ready yet: a re-sent file replaces the stored one
        assert again.status_code == 200 and again.json()["success"] is True
        assert_error(client.post(run, json={"prompt": "x", "lora": "half"}), 400, 3039, "adapter_model.safetensors")
        for bad_name in ("../adapter_config.json", "/etc/passwd", "weights.bin"):
            r = client.post(f"{base}/{half['id']}/finetune-assets", data={"file_name": bad_name}, files=files)
            assert_error(r, 400, 5004, "file_name")

        # an adapter over the rank limit is refused with the validator's message; nothing recorded
        big = client.post(base, json={"model": MODEL, "name": "big"}).json()["result"]
        for file_name in ("adapter_config.json", "adapter_model.safetensors"):
            r = client.post(f"{base}/{big['id']}/finetune-assets", data={"file_name": file_name},
                            files={"file": (file_name, (adapters["rank40"] / file_name).read_bytes())})
        assert_error(r, 400, 5004, "rank 40")
        assert client.get(f"{base}/big").json()["result"]["state"] == "invalid"

        # the per-account limit (100 by default): 98 more fit, the 101st is refused
        for i in range(DEFAULT_MAX_FINETUNES_PER_ACCOUNT - 2):
            assert client.post(base, json={"model": MODEL, "name": f"n{i}"}).status_code == 200
        assert_error(client.post(base, json={"model": MODEL, "name": "one-too-many"}), 429, 3036)
        assert client.delete(f"{base}/n0").status_code == 200
        assert client.post(base, json={"model": MODEL, "name": "fits-again"}).status_code == 200


def test_upload_over_the_limit_is_refused_while_streaming(server, alice, monkeypatch):
    account_id, token = alice
    monkeypatch.setattr(server.ctx.limits, "max_adapter_bytes", 64 << 10)
    with http(server, token) as client:
        finetune = client.post(f"/accounts/{account_id}/ai/finetunes", json={"model": MODEL, "name": "huge"}).json()
        path = f"/accounts/{account_id}/ai/finetunes/{finetune['result']['id']}/finetune-assets"
        files = {"file": ("adapter_model.safetensors", b"\0" * (256 << 10))}
        assert_error(client.post(path, data={"file_name": "adapter_model.safetensors"}, files=files), 413, 3006)

        # no Content-Length (chunked): the limit is enforced on the bytes as they arrive
        boundary = "loraplexboundary"
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file_name"\r\n\r\nadapter_model.safetensors\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="w"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n").encode()

        def chunks():
            yield head
            for _ in range(64):
                yield b"\0" * (16 << 10)
            yield f"\r\n--{boundary}--\r\n".encode()

        r = client.post(path, content=chunks(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert_error(r, 413, 3006)
        assert client.get(path.removesuffix("/finetune-assets")).json()["result"]["assets"] == []


def test_json_body_over_the_limit(server, alice, monkeypatch):
    account_id, token = alice
    monkeypatch.setattr(server.ctx.limits, "max_json_body_bytes", 1024)
    with http(server, token) as client:
        path = f"/accounts/{account_id}/ai/run/{MODEL}"
        assert_error(client.post(path, json={"prompt": "x" * 2048}), 413, 3006)
        chunked = client.post(path, content=iter([b'{"prompt": "', b"x" * 2048, b'"}']))
        assert_error(chunked, 413, 3006)
        assert client.post(path, json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_queue_full_is_429(server, alice, monkeypatch):
    account_id, token = alice
    monkeypatch.setattr(server.ctx.engine, "max_pending", 0)
    with http(server, token) as client:
        assert_error(client.post(f"/accounts/{account_id}/ai/run/{MODEL}", json={"prompt": "x"}), 429, 3040)


def test_tenant_isolation(server, alice, bob, alice_finetunes, adapters):
    alice_id, alice_token = alice
    bob_id, bob_token = bob
    private_id = alice_finetunes["qv"]
    public_id = upload(server, alice, "shared", adapters["qv"], public=True)
    with http(server, bob_token) as client:
        base = f"/accounts/{bob_id}/ai/finetunes"
        assert client.get(base).json()["result"] == []
        assert [f["id"] for f in client.get(f"{base}/public").json()["result"]] == [public_id]
        for ref in (private_id, "qv"):
            assert_error(client.get(f"{base}/{ref}"), 404, 3037)
            assert_error(client.delete(f"{base}/{ref}"), 404, 3037)
            assert_error(client.post(f"/accounts/{bob_id}/ai/run/{MODEL}", json={"prompt": "x", "lora": ref}), 404, 3037)
            r = client.post(f"{base}/{ref}/finetune-assets", data={"file_name": "adapter_config.json"},
                            files={"file": ("c", b"{}")})
            assert_error(r, 404, 3037)
        # a public finetune is usable by id, but only its owner may change it
        ok = client.post(f"/accounts/{bob_id}/ai/run/{MODEL}", json={"prompt": "x", "lora": public_id, "max_tokens": 2})
        assert ok.status_code == 200
        assert_error(client.delete(f"{base}/{public_id}"), 403, 10000)
    with http(server, alice_token) as client:
        assert client.delete(f"/accounts/{alice_id}/ai/finetunes/{public_id}").status_code == 200


def test_delete_finetune_removes_unshared_objects(server, adapters):
    account_id, token = server.account("deleter")
    finetune_id = upload(server, (account_id, token), "temp", adapters["all-linear"])
    assets = server.ctx.registry.get_finetune(account_id, finetune_id).assets.values()
    with http(server, token) as client:
        assert client.post(f"/accounts/{account_id}/ai/run/{MODEL}",
                           json={"prompt": "x", "lora": "temp", "max_tokens": 2}).status_code == 200
        assert client.delete(f"/accounts/{account_id}/ai/finetunes/temp").status_code == 200
        assert_error(client.post(f"/accounts/{account_id}/ai/run/{MODEL}", json={"prompt": "x", "lora": "temp"}),
                     404, 3037)
    for asset in assets:  # alice's "all-linear" holds the same bytes: shared objects stay
        shared = server.ctx.registry.object_key_in_use(asset.object_key)
        assert server.ctx.store.exists(asset.object_key) == shared


def test_client_disconnect_mid_stream_frees_kv_blocks(server, alice, alice_finetunes):
    account_id, token = alice
    body = {"prompt": PROMPT, "raw": True, "max_tokens": 400, "temperature": 0, "stream": True, "lora": "qv"}
    for _ in range(3):
        with http(server, token) as client, client.stream("POST", f"/accounts/{account_id}/ai/run/{MODEL}",
                                                          json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            assert server.ctx.engine.stats().running == 1
        # leaving the block closed the connection mid-stream
    server.wait_idle()
    assert server.ctx.engine.num_in_flight == 0


def test_client_gone_before_a_non_streamed_reply_aborts_it(server, alice, alice_finetunes, monkeypatch):
    account_id, token = alice
    engine = server.ctx.engine.engine
    aborted, abort = [], engine.abort
    monkeypatch.setattr(engine, "abort", lambda request_id: aborted.append(request_id) or abort(request_id))
    body = {"prompt": PROMPT, "raw": True, "max_tokens": 400, "temperature": 0, "lora": "qv"}
    routes = [(f"/accounts/{account_id}/ai/run/{MODEL}", body),
              (f"/accounts/{account_id}/ai/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 400,
                                                             "temperature": 0, "lora": "qv"})]
    for i, (route, payload) in enumerate(routes):
        with http(server, token) as client:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up while the reply is computed
                client.post(route, json=payload, timeout=httpx.Timeout(5.0, read=0.3))
        deadline = time.monotonic() + 5
        while len(aborted) <= i and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(aborted) == i + 1, "the request ran on after its client had gone"
        server.wait_idle()


def test_metrics(server, alice, alice_finetunes):
    account_id, token = alice
    with http(server, token) as client:
        client.post(f"/accounts/{account_id}/ai/run/{MODEL}", json={"prompt": "x", "max_tokens": 3, "lora": "qv"})
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("loraplex_requests_total", "loraplex_generation_tokens_total",
                 "loraplex_time_to_first_token_seconds_bucket", "loraplex_time_per_output_token_seconds_bucket",
                 "loraplex_requests_waiting", "loraplex_lora_slots_occupied", "loraplex_kv_blocks_used",
                 'loraplex_adapter_cache_hits_total{tier="host"}', 'loraplex_adapter_load_seconds_total{tier="remote"}'):
        assert name in text, name
    loads = {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
             if line.startswith("loraplex_adapter_loads_total")}
    # every adapter this server downloaded was parsed once (nothing evicted here): counted per
    # adapter, not per file (two files each)
    assert loads["remote"] >= 1 and loads["remote"] == loads["disk"], loads
    slots = [line for line in text.splitlines() if line.startswith("loraplex_lora_slots_total")]
    assert slots == ["loraplex_lora_slots_total 2.0"]
    assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"


# --- the CLI's client and operator commands ---------------------------------------------------

def test_serve_flags_reach_the_engine_config(tmp_path):
    from loraplex.cli import _byte_size, _parser, _server_options
    from loraplex.config import engine_config

    def options(*flags):
        return _server_options(_parser().parse_args(["serve", "--data-dir", str(tmp_path), *flags]))

    assert options().engine == engine_config("default")  # no flag: every default from config.py
    engine = options("--adapter-host-cache", "512MiB", "--adapter-disk-cache", "2GB", "--adapter-workers", "3",
                     "--max-loras", "4", "--block-size", "32", "--max-num-batched-tokens", "512", "--no-cuda-graphs",
                     "--retry-failed-adapter-after", "0.5").engine
    lora = engine.lora
    assert (lora.adapter_host_cache_bytes, lora.adapter_disk_cache_bytes, lora.adapter_workers, lora.max_loras,
            lora.retry_failed_adapter_after_s) == (2**29, 2 * 10**9, 3, 4, 0.5)
    assert (engine.cache.block_size, engine.scheduler.max_num_batched_tokens, engine.model.cuda_graphs) == (32, 512, False)
    assert _byte_size("1.5GiB") == 3 * 2**29 and _byte_size("123") == 123
    for bad in ("lots", "5XB", "-1", "GiB"):
        with pytest.raises(argparse.ArgumentTypeError):
            _byte_size(bad)
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--adapter-host-cache", "a lot"])
    with pytest.raises(ValueError, match="adapter_workers"):
        options("--adapter-workers", "0")


def test_cli_commands(server, adapters, tmp_path, monkeypatch, capsys):
    from loraplex.cli import main

    assert main(["accounts", "create", "cli-user", "--data-dir", str(tmp_path)]) == 0
    created = json.loads(capsys.readouterr().out)
    assert set(created) == {"account_id", "token"}
    from loraplex.adapters.registry import open_registry

    assert open_registry(tmp_path).authenticate(created["token"]) == created["account_id"]

    account_id, token = server.account("cli")
    monkeypatch.setenv("LORAPLEX_ACCOUNT_ID", account_id)
    monkeypatch.setenv("LORAPLEX_API_TOKEN", token)
    url = ["--url", server.url]
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_config.json").write_text("{}")
    assert main(["finetunes", "create", MODEL, "half", str(tmp_path / "half"), *url]) == 1
    assert "adapter_model.safetensors" in capsys.readouterr().err
    assert main(["finetunes", "create", MODEL, "mine", str(adapters["qv"]), *url]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "mine"
    assert main(["finetunes", "list", *url]) == 0
    assert [json.loads(line)["name"] for line in capsys.readouterr().out.splitlines()] == ["mine"]
    assert main(["run", MODEL, PROMPT, "--lora", "mine", "--raw", "--max-tokens", "4", *url]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["run", MODEL, PROMPT, "--lora", "nope", *url]) == 1
    assert "3037" in capsys.readouterr().err
