"""Engine behaviour on the real default model: chat, stop conditions, streaming text, errors."""

from __future__ import annotations

import pytest

from loraplex import LLM, SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
IM_END = 2  # <|im_end|>, SmolLM2's EOS


@pytest.fixture(scope="module")
def llm(default_model_dir):
    return LLM(str(default_model_dir), dtype="float32", device="cpu", kv_cache_memory=64 << 20)


def assert_all_blocks_free(llm: LLM) -> None:
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks
    assert not llm.engine.has_unfinished()


def test_greedy_chat_answers_paris(llm):
    out = llm.chat([QUESTION], SamplingParams(max_tokens=32, temperature=0.0))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop" and out.token_ids[-1] == IM_END
    assert "<|im_end|>" not in out.text
    assert out.logprobs is None
    assert_all_blocks_free(llm)


def test_stop_string_cuts_the_text(llm):
    full = llm.chat([QUESTION], SamplingParams(max_tokens=32, temperature=0.0))[0]
    stop = "France is"
    assert stop in full.text
    out = llm.chat([QUESTION], SamplingParams(max_tokens=32, temperature=0.0, stop=[stop, "never-appears"]))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.index(stop)]
    assert len(out.token_ids) < len(full.token_ids)


def test_stop_token_ids_and_ignore_eos(llm):
    full = llm.chat([QUESTION], SamplingParams(max_tokens=32, temperature=0.0))[0]
    stop_at = full.token_ids[3]
    out = llm.chat([QUESTION], SamplingParams(max_tokens=32, temperature=0.0, stop_token_ids=[stop_at]))[0]
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[: full.token_ids.index(stop_at) + 1]
    n = len(full.token_ids) + 5
    long = llm.chat([QUESTION], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=True))[0]
    assert long.finish_reason == "length" and len(long.token_ids) == n and len(long.logprobs) == n
    assert long.token_ids[: len(full.token_ids)] == full.token_ids


@pytest.mark.parametrize("stop", [None, ["zzz-never", "the sea!"]])
def test_streamed_text_grows_and_ends_as_the_full_decode(llm, stop):
    engine = llm.engine
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": "Write a haiku about the sea, with an emoji."}])
    engine.add_request("stream", prompt, SamplingParams(max_tokens=48, temperature=0.0, stop=stop))
    texts = []
    while engine.has_unfinished():
        for out in engine.step():
            texts.append(out.text)
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert all("\ufffd" not in t for t in texts)
    assert texts[-1] == llm.tokenizer.decode(out.token_ids)
    if stop:  # text held back while a stop string could still be forming, released at the end
        assert len(texts[-2]) <= len(texts[-1]) - len("zzz-never") + 1
    assert_all_blocks_free(llm)


def test_abort_frees_blocks(llm):
    engine = llm.engine
    prompt = llm.tokenizer.encode("Once upon a time")
    for i in range(3):
        engine.add_request(f"a{i}", prompt, SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert llm.engine.block_manager.num_free_blocks < llm.engine.block_manager.num_blocks
    for i in range(3):
        assert engine.abort(f"a{i}").finish_reason == "abort"
    assert engine.abort("unknown") is None
    assert_all_blocks_free(llm)


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ([], SamplingParams(), "empty"),
        ([1] * 9000, SamplingParams(), "context window"),
        ([10**6], SamplingParams(), "token ids must lie in"),
    ],
)
def test_bad_requests_are_refused_and_nothing_is_queued(llm, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        llm.engine.add_request("bad", prompt, params)
    assert_all_blocks_free(llm)


def test_unknown_lora_is_refused(llm):
    with pytest.raises(ValueError, match="no LoRA adapter named 'missing'"):
        llm.generate(["hi"], SamplingParams(max_tokens=2), lora="missing")
    assert_all_blocks_free(llm)


def test_request_larger_than_the_cache_is_refused(default_model_dir):
    small = LLM(str(default_model_dir), dtype="float32", device="cpu", kv_cache_memory=2 << 20)
    blocks = small.engine.block_manager.num_blocks
    with pytest.raises(ValueError, match="does not fit in the KV cache"):
        small.generate([[1] * 10], SamplingParams(max_tokens=blocks * 16))
    assert_all_blocks_free(small)
