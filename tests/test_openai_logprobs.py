"""OpenAI dialect through the real `openai` SDK against a live server: `logprobs`,
`top_logprobs` (chat) and legacy `logprobs` (completions), `n` choices (streamed too, with
`index`), and token counts that leave out the end-of-sequence token. Every value is compared with
the offline `LLM` on the same model."""

from __future__ import annotations

import pytest
import torch
from openai import OpenAI

from api_server import LiveServer, server_options
from loraplex import LLM, SamplingParams
from loraplex.api.choices import token_label
from tiny_models import make_tiny_model

MODEL = "@cf/test/tiny-llama"
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Tell me a story"}]
EOS = 257  # tiny_models' eos_token_id
CLOSE = dict(rel=1e-4, abs=1e-4)  # logprobs: the same float32 computation, batch shapes aside


def offline_llm(folder) -> LLM:
    return LLM(str(folder), dtype="float32", device="cpu", kv_cache_memory=8 << 20)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model whose greedy answers to PROMPT and MESSAGES end with the end-of-sequence
    token after a few tokens: its lm_head row for EOS is made a scaled copy of the row of a token
    the greedy answer would have produced."""
    folder = tmp_path_factory.mktemp("tiny-llama-eos")
    model = make_tiny_model("llama", folder)
    plain = offline_llm(folder)
    params = SamplingParams(max_tokens=12, temperature=0)
    targets = [plain.generate([PROMPT], params)[0].token_ids, plain.chat([MESSAGES], params)[0].token_ids]
    del plain
    for position in (3, 4, 5, 2, 6):
        for scale in (1.05, 0.95, 1.2, 0.8):
            with torch.no_grad():
                model.lm_head.weight[EOS] = model.lm_head.weight[targets[0][position]] * scale
            model.save_pretrained(folder, safe_serialization=True)
            llm = offline_llm(folder)
            outs = [llm.generate([PROMPT], params)[0], llm.chat([MESSAGES], params)[0]]
            if all(o.finish_reason == "stop" and o.token_ids[-1] == EOS and len(o.token_ids) >= 3 for o in outs):
                return folder
    pytest.fail("could not make a tiny model whose greedy answers end with EOS")


@pytest.fixture(scope="module")
def offline(model_dir):
    return offline_llm(model_dir)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    live = LiveServer.start(server_options(model_dir, tmp_path_factory.mktemp("data")))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    account_id, token = server.account("logprobs")
    return OpenAI(api_key=token, base_url=f"{server.url}/client/v4/accounts/{account_id}/ai/v1", max_retries=0)


def token_text(offline: LLM, token_id: int) -> str:
    """How OpenAI labels a token: its text, or `bytes:\\xNN` when it is not whole UTF-8."""
    return token_label(offline.tokenizer, token_id)


def counted(out) -> tuple[list[int], list[float], list[dict[int, float]] | None]:
    """The offline output's token ids, logprobs and top logprobs without the final EOS."""
    n = out.num_generated_tokens
    return out.token_ids[:n], out.logprobs[:n], out.top_logprobs[:n] if out.top_logprobs else None


def assert_chat_logprobs(entries, out, offline: LLM, k: int) -> None:
    ids, logprobs, tops = counted(out)
    assert [e.token for e in entries] == [token_text(offline, t) for t in ids]
    assert b"".join(bytes(e.bytes) for e in entries).decode() == out.text  # the bytes spell the text
    assert [e.logprob for e in entries] == pytest.approx(logprobs, **CLOSE)
    for entry, top in zip(entries, tops or [{}] * len(ids)):
        assert len(entry.top_logprobs) == k
        assert [t.token for t in entry.top_logprobs] == [token_text(offline, t) for t in top]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(list(top.values()), **CLOSE)


def test_eos_is_not_counted_nor_shown(client, offline):
    expected = offline.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0))[0]
    assert expected.token_ids[-1] == EOS and expected.finish_reason == "stop"
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert reply.choices[0].text == expected.text and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == len(expected.token_ids) - 1 == expected.num_generated_tokens
    chat_expected = offline.chat([MESSAGES], SamplingParams(max_tokens=12, temperature=0))[0]
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == chat_expected.text
    assert chat.usage.completion_tokens == len(chat_expected.token_ids) - 1
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens


def test_chat_logprobs_and_top_logprobs_equal_offline(client, offline):
    expected = offline.chat([MESSAGES], SamplingParams(max_tokens=12, temperature=0, logprobs=True, top_logprobs=3))[0]
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0,
                                           logprobs=True, top_logprobs=3)
    assert reply.choices[0].message.content == expected.text
    assert_chat_logprobs(reply.choices[0].logprobs.content, expected, offline, k=3)
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True)
    assert all(entry.top_logprobs == [] for entry in plain.choices[0].logprobs.content)
    without = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0)
    assert without.choices[0].logprobs is None


def test_streamed_chat_logprobs_equal_offline(client, offline):
    expected = offline.chat([MESSAGES], SamplingParams(max_tokens=12, temperature=0, logprobs=True, top_logprobs=2))[0]
    entries, text = [], ""
    for chunk in client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0,
                                                logprobs=True, top_logprobs=2, stream=True):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs is not None:
                entries += choice.logprobs.content
    assert text == expected.text
    assert_chat_logprobs(entries, expected, offline, k=2)


def test_completion_logprobs_equal_offline(client, offline):
    expected = offline.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, top_logprobs=2))[0]
    ids, logprobs, tops = counted(expected)
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=2)
    lp = reply.choices[0].logprobs
    assert lp.tokens == [token_text(offline, t) for t in ids]
    assert lp.token_logprobs == pytest.approx(logprobs, **CLOSE)
    assert [list(d) for d in lp.top_logprobs] == [[token_text(offline, t) for t in top] for top in tops]
    assert [list(d.values()) for d in lp.top_logprobs] == [pytest.approx(list(top.values()), **CLOSE) for top in tops]
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert lp.text_offset[-1] <= len(reply.choices[0].text)
    streamed = []
    for chunk in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=2,
                                           stream=True):
        if chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.token_logprobs
    assert streamed == pytest.approx(logprobs, **CLOSE)


def test_n_choices_chat_and_completions(client, offline):
    greedy = offline.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0))[0]
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.text == greedy.text for c in reply.choices)
    assert reply.usage.completion_tokens == 3 * greedy.num_generated_tokens
    assert reply.usage.prompt_tokens == len(greedy.prompt_token_ids)
    # sampled with a seed: choice i draws from seed + i, so the choices differ and equal offline's
    seeded = [SamplingParams(max_tokens=16, temperature=1.0, seed=7 + i) for i in range(4)]
    expected = offline.chat([MESSAGES] * 4, seeded)
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=1.0, seed=7, n=4)
    assert [c.message.content for c in chat.choices] == [e.text for e in expected]
    assert len({c.message.content for c in chat.choices}) > 1


def test_n_choices_streamed_with_their_index(client, offline):
    seeded = [SamplingParams(max_tokens=16, temperature=1.0, seed=3 + i) for i in range(3)]
    expected = offline.generate([PROMPT] * 3, seeded)
    texts, finish, usage = {}, {}, None
    for chunk in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=3, n=3,
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    assert [texts[i] for i in range(3)] == [e.text for e in expected]
    assert [finish[i] for i in range(3)] == [e.finish_reason for e in expected]
    assert usage.completion_tokens == sum(e.num_generated_tokens for e in expected)
    chat_texts = {}
    for chunk in client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, n=2,
                                                stream=True):
        for choice in chunk.choices:
            chat_texts[choice.index] = chat_texts.get(choice.index, "") + (choice.delta.content or "")
    greedy = offline.chat([MESSAGES], SamplingParams(max_tokens=6, temperature=0))[0].text
    assert chat_texts == {0: greedy, 1: greedy}


def test_n_and_top_logprobs_bounds(client):
    import openai

    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, n=17)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, logprobs=True, top_logprobs=21)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, top_logprobs=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, logprobs=6)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=17)
