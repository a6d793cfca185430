"""Hostile request bodies against a live server: lax types, unbounded stop lists, values that
underflow to 0 in float32, and prompts too large to tokenize. Each is refused (400 / 5004, or
OpenAI's invalid_request_error under /v1) or served exactly; the server serves the offline text
afterwards."""

from __future__ import annotations

import threading

import httpx
import pytest
from openai import BadRequestError, OpenAI

from api_server import LiveServer, server_options
from loraplex import LLM, SamplingParams
from loraplex.api.schemas import MAX_PROMPT_CHARS
from loraplex.config import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS
from error_log import ErrorLog

MODEL = "@cf/test/tiny-llama"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    live = LiveServer.start(server_options(model_dir, tmp_path_factory.mktemp("data")))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def offline(model_dir):
    return LLM(str(model_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20)


@pytest.fixture(scope="module")
def tenant(server):
    return server.account("hostile")


@pytest.fixture
def ai(server, tenant):
    account_id, token = tenant
    with httpx.Client(base_url=f"{server.url}/client/v4/accounts/{account_id}/ai",
                      headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        yield client


@pytest.fixture
def openai_client(server, tenant):
    account_id, token = tenant
    return OpenAI(api_key=token, base_url=f"{server.url}/client/v4/accounts/{account_id}/ai/v1", max_retries=0)


def assert_refused(response: httpx.Response, needle: str = "") -> None:
    """400 with code 5004, in the Workers AI envelope or (under /v1) OpenAI's error object."""
    assert response.status_code == 400, response.text
    body = response.json()
    if "/v1/" in str(response.url):
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == 5004, body
        message = body["error"]["message"]
    else:
        assert body["success"] is False and body["errors"][0]["code"] == 5004, body
        message = body["errors"][0]["message"]
    assert needle in message, message


def greedy(offline: LLM, max_tokens: int = 8) -> str:
    return offline.generate([PROMPT], SamplingParams(max_tokens=max_tokens, temperature=0))[0].text


RUN = {"prompt": PROMPT, "raw": True, "max_tokens": 8}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8}
COMPLETION = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8}
LAX = [  # (route, body, the field named in the refusal)
    ("run", RUN | {"raw": "yes"}, "raw"),
    ("run", RUN | {"raw": "true"}, "raw"),
    ("run", RUN | {"stream": 1}, "stream"),
    ("run", RUN | {"max_tokens": True}, "max_tokens"),
    ("run", RUN | {"max_tokens": 8.0}, "max_tokens"),
    ("run", RUN | {"temperature": "0.5"}, "temperature"),
    ("run", RUN | {"top_k": True}, "top_k"),
    ("run", RUN | {"seed": "7"}, "seed"),
    ("run", {"messages": [{"role": "user", "content": 5}], "max_tokens": 8}, "content"),
    ("chat", CHAT | {"max_tokens": True}, "max_tokens"),
    ("chat", CHAT | {"stream": "yes"}, "stream"),
    ("chat", CHAT | {"n": True}, "n"),
    ("chat", CHAT | {"logprobs": "yes"}, "logprobs"),
    ("chat", CHAT | {"top_logprobs": True, "logprobs": True}, "top_logprobs"),
    ("chat", CHAT | {"stream": True, "stream_options": {"include_usage": "yes"}}, "include_usage"),
    ("completion", COMPLETION | {"max_tokens": True}, "max_tokens"),
    ("completion", COMPLETION | {"stop": 5}, "stop"),
    ("finetune", {"model": MODEL, "name": "lax", "public": "yes"}, "public"),
    ("finetune", {"model": MODEL, "name": 7}, "name"),
]
ROUTES = {"run": f"/run/{MODEL}", "chat": "/v1/chat/completions", "completion": "/v1/completions",
          "finetune": "/finetunes"}


@pytest.mark.parametrize("route, body, field", LAX, ids=[f"{r}-{f}-{i}" for i, (r, _, f) in enumerate(LAX)])
def test_lax_types_are_refused(ai, route, body, field):
    assert_refused(ai.post(ROUTES[route], json=body), field)


def test_strict_types_still_accept_integers_for_numbers(ai, offline):
    reply = ai.post(f"/run/{MODEL}", json=RUN | {"temperature": 0, "top_p": 1})
    assert reply.status_code == 200, reply.text
    assert reply.json()["result"]["response"] == greedy(offline)


def test_stop_lists_are_bounded(ai, openai_client, offline):
    too_many = [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]
    assert_refused(ai.post("/v1/chat/completions", json=CHAT | {"stop": too_many}), "stop")
    assert_refused(ai.post("/v1/completions", json=COMPLETION | {"stop": ["x" * (MAX_STOP_STRING_CHARS + 1)]}), "stop")
    assert_refused(ai.post("/v1/completions", json=COMPLETION | {"stop": [f"{i}" for i in range(100_000)]}), "stop")
    with pytest.raises(BadRequestError) as refused:  # the OpenAI SDK sees its own error type
        openai_client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, stop=too_many)
    assert refused.value.status_code == 400 and "stop" in refused.value.body["message"]
    # the most that is allowed works, and stops where the offline engine stops
    text = greedy(offline, 16)
    stops = [text[4:7]] + ["\x00" * MAX_STOP_STRING_CHARS] * (MAX_STOP_STRINGS - 1)
    reply = openai_client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=stops)
    expected = offline.generate([PROMPT], SamplingParams(max_tokens=16, temperature=0, stop=stops))[0]
    assert reply.choices[0].text == expected.text == text[:4] and reply.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("extra", [{"temperature": 1e-300}, {"temperature": 1e-8}, {"temperature": 5e-324},
                                   {"temperature": 1.0, "top_p": 1e-300}, {"temperature": 1.0, "top_p": 5e-324}])
def test_values_that_underflow_in_float32_decode_greedily(ai, openai_client, offline, extra):
    """A temperature under 1e-5 is greedy; a top_p that is 0 in float32 keeps the top token only:
    both equal the greedy text (never NaN sampling, never empty text)."""
    expected = greedy(offline)
    assert expected
    reply = ai.post(f"/run/{MODEL}", json=RUN | extra)
    assert reply.status_code == 200, reply.text
    assert reply.json()["result"]["response"] == expected
    chat_expected = offline.chat([CHAT["messages"]], SamplingParams(max_tokens=8, temperature=0))[0].text
    chat = openai_client.chat.completions.create(model=MODEL, messages=CHAT["messages"], max_tokens=8, **extra)
    assert chat.choices[0].message.content == chat_expected and chat_expected


@pytest.mark.parametrize("penalty", [1e-300, 0.0, 0.001])
def test_repetition_penalty_that_would_divide_by_zero_is_refused(ai, penalty):
    assert_refused(ai.post(f"/run/{MODEL}", json=RUN | {"repetition_penalty": penalty}), "repetition_penalty")


def test_prompts_too_large_to_fit_are_refused_before_tokenizing(server, ai, monkeypatch):
    tokenized = []
    tokenizer = server.ctx.tokenizer
    monkeypatch.setattr(tokenizer, "encode", lambda *a, **k: tokenized.append(a) or [])
    # more characters than the context window could hold whatever the tokens
    too_long = "x" * (server.ctx.max_model_len * tokenizer.max_token_chars)
    assert_refused(ai.post(f"/run/{MODEL}", json=RUN | {"prompt": too_long}), "context window")
    assert_refused(ai.post("/v1/chat/completions", json=CHAT | {"messages": [{"role": "user", "content": too_long}]}),
                   "context window")
    # more than MAX_PROMPT_CHARS in all messages together (each one alone is small), in a body under the limit
    many = [{"role": "user", "content": "y" * 4096}] * (MAX_PROMPT_CHARS // 4096 + 1)
    assert_refused(ai.post(f"/run/{MODEL}", json={"messages": many}), "characters")
    assert_refused(ai.post("/v1/chat/completions", json=CHAT | {"messages": many}), "characters")
    assert tokenized == []


def test_prompts_are_tokenized_off_the_event_loop(server, ai, offline, monkeypatch):
    """Tokenizing (and rendering the chat template) runs in worker threads, never on the thread
    that runs the server's event loop; the tokenizer releases the GIL meanwhile."""
    threads = []
    tokenizer = server.ctx.tokenizer
    encode = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda *a, **k: threads.append(threading.current_thread()) or encode(*a, **k))
    assert ai.post(f"/run/{MODEL}", json=RUN).status_code == 200
    assert ai.post(f"/run/{MODEL}", json={"messages": CHAT["messages"], "max_tokens": 8}).status_code == 200
    assert ai.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert ai.post("/v1/completions", json=COMPLETION).status_code == 200
    assert len(threads) == 4 and server._thread not in threads


def test_server_is_healthy_after_the_hostile_bodies(server, ai, offline):
    with ErrorLog().watching() as errors:
        for route, body, _ in LAX:
            ai.post(ROUTES[route], json=body)
        reply = ai.post(f"/run/{MODEL}", json=RUN | {"temperature": 0})
    assert reply.status_code == 200 and reply.json()["result"]["response"] == greedy(offline)
    assert errors.messages() == []
    server.wait_idle(timeout_s=60)


def test_through_the_cloudflare_sdk(server, tenant, offline):
    """What a Workers AI client meets: a lax boolean is a BadRequestError naming the field (5004);
    a temperature of 1e-300 is greedy and equals the offline text."""
    import cloudflare

    account_id, token = tenant
    cf = cloudflare.Cloudflare(api_token=token, base_url=f"{server.url}/client/v4", max_retries=0)
    with pytest.raises(cloudflare.BadRequestError) as refused:
        cf.ai.run(MODEL, account_id=account_id, prompt=PROMPT, raw="yes", max_tokens=8)
    assert refused.value.status_code == 400
    assert refused.value.body["errors"][0]["code"] == 5004 and "raw" in refused.value.body["errors"][0]["message"]
    result = cf.ai.run(MODEL, account_id=account_id, prompt=PROMPT, raw=True, max_tokens=8, temperature=1e-300)
    assert result["response"] == greedy(offline)


def test_the_engine_refuses_unbounded_stop_lists_too():
    """The offline API (and anything else building SamplingParams) meets the same bounds."""
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=[f"s{i}" for i in range(MAX_STOP_STRINGS + 1)])
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop="x" * (MAX_STOP_STRING_CHARS + 1))
    assert SamplingParams(temperature=1e-300).greedy and not SamplingParams(temperature=1e-4).greedy
