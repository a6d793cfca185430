"""loraplex.tokenizer against transformers.AutoTokenizer, on tiny tokenizers built here (no downloads).

Tokenizer folders built by the fixtures:
  * bytelevel: GPT-2/Llama-3 style byte-level BPE, a BOS post-processor, ChatML special tokens, a
    non-special added token, an extra special token only named in tokenizer_config.json, and eos ids
    spread over tokenizer_config.json / config.json / generation_config.json;
  * spm-legacy / spm-metaspace / spm-noprefix: SentencePiece-style BPE with `<0x..>` byte fallback,
    in the Llama-2 (normalizer Prepend+Replace, Strip decoder), Mistral (Metaspace pre-tokenizer and
    decoder) and Gemma (no prefix space) flavours, with "</s>" only in the base vocab (transformers makes
    it special because tokenizer_config.json names it) and a model-specific `image_token`.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer

from loraplex.tokenizer import ChatTemplateError, IncrementalDetokenizer, Tokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

CORPUS = [
    "Hello world! This is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog, again and again.",
    "Tokenizers split text into pieces; models read the pieces.",
    "Café, naïve, résumé, façade: accented words are common in French.",
    "日本語のテキストも少し入れておきます。東京は大きい。",
    "Numbers like 12345 and 3.14159 and dates like 2024-01-31 appear too.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "  Leading spaces, trailing spaces,   and\ttabs.  ",
] * 3

SAMPLES = [
    "",
    " ",
    "Hello world",
    "hello   world  ",
    "  two leading spaces",
    "line one\nline two\n\n  indented\r\nwindows\tand tabs",
    "Café naïve résumé — “quotes” ½",
    "日本語のテキスト 東京 中文测试 한국어",
    "emoji 🎉👍🏽 in 🇫🇷 text 🤖",
    "🎉",
    "mixed: x=42; y='日本'; z=\"émoji 🐍\"",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<think>reasoning</think> answer <tool_call>{}</tool_call>",
    "<s>[INST] hi [/INST] ok</s><s>",
    "a </s> b <image> c <unk>",
]

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Gemma/Llama style: bos_token, a system message folded into the first turn, alternation enforced with
# raise_exception, loop.first/loop.last, tojson (indent, non-ASCII, "<"), namespace, loop controls.
GEMMA_STYLE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set system = messages[0]['content'] -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set system = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- set ns = namespace(turns=0) -%}
{%- if tools %}
<tools>
{{ tools | tojson(indent=2) }}
</tools>
{% endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif -%}
    {%- if message['role'] == 'skip' %}{% continue %}{% endif -%}
    {%- set ns.turns = ns.turns + 1 -%}
    {%- if ns.turns > 100 %}{% break %}{% endif -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    <start_of_turn>{{ role }}
{% if loop.first and system %}{{ system }}

{% endif %}
{%- if message.reasoning_content is defined %}<think>{{ message.reasoning_content }}</think>{% endif -%}
{{ message['content'] | trim }}
{% if message.metadata is defined %}{{ message.metadata | tojson }}
{% endif %}
{%- if loop.last and message['role'] == 'assistant' %}<end_of_turn>{{ eos_token }}
{% else %}<end_of_turn>
{% endif %}
{%- endfor -%}
{%- if add_generation_prompt -%}<start_of_turn>model
{% endif -%}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "You are terse. Réponds en français 🇫🇷."},
        {"role": "user", "content": "  What's 2+2?  "},
        {"role": "assistant", "content": "4", "metadata": {"source": "<calc>", "ok": True, "ja": "日本"}},
        {"role": "user", "content": "And 日本語? 🎉"},
    ],
    [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two", "tool_calls": None, "reasoning": "count up"},
    ],
]

TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Météo <today>", "parameters": {}}}]


# ---------------------------------------------------------------- tokenizer builders


def _train_bpe(pre_tokenizer, vocab_size: int, **trainer_kwargs) -> tuple[dict, list]:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.train_from_iterator(CORPUS, BpeTrainer(vocab_size=vocab_size, show_progress=False, **trainer_kwargs))
    data = json.loads(tok.to_str())
    return data["model"]["vocab"], data["model"]["merges"]


def _save(folder: Path, tok: HFTokenizer, config: dict, model_config: dict | None = None, gen_config=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1))
    if model_config is not None:
        (folder / "config.json").write_text(json.dumps(model_config))
    if gen_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(gen_config))
    return folder


def build_bytelevel(folder: Path) -> Path:
    vocab, merges = _train_bpe(
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        vocab_size=600,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens(specials)
    tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)]
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False, "special": True},
        "pad_token": "<|end_of_text|>",
        "additional_special_tokens": ["<tool_call>", "</tool_call>"],  # not in tokenizer.json: added by the config
        "chat_template": CHATML,
        "model_max_length": 4096,
    }
    end_of_text = tok.token_to_id("<|end_of_text|>")
    return _save(folder, tok, config, {"eos_token_id": end_of_text}, {"eos_token_id": [end_of_text, 7]})


def build_spm(folder: Path, style: str) -> Path:
    """SentencePiece-like BPE: <unk> <s> </s>, 256 <0x..> byte tokens, then pieces; byte fallback on."""
    trained, merges = _train_bpe(
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        vocab_size=500,
        limit_alphabet=60,  # rare characters (most CJK, all emoji) must go through byte fallback
    )
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in sorted(trained, key=trained.get):
        vocab.setdefault(piece, len(vocab))
    tok = HFTokenizer(
        models.BPE(vocab=vocab, merges=[tuple(m) for m in merges], unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    if style == "legacy":  # Llama-2's tokenizer.json
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    elif style == "metaspace":  # Mistral / newer conversions
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)]
        )
    else:  # "noprefix": Gemma
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    # "</s>" stays a plain vocab entry: tokenizer_config.json naming it as eos_token makes it special.
    tok.add_special_tokens([AddedToken("<unk>", normalized=False), AddedToken("<s>", normalized=False)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "image_token": "<image>",  # model-specific special token, not in the vocab at all
        "add_bos_token": True,
        "chat_template": GEMMA_STYLE,
    }
    return _save(folder, tok, config, {"eos_token_id": 2, "bos_token_id": 1})


KINDS = ["bytelevel", "spm-legacy", "spm-metaspace", "spm-noprefix"]


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    """(ours, transformers') for one tokenizer folder."""
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "bytelevel":
        build_bytelevel(folder)
    else:
        build_spm(folder, request.param.split("-")[1])
    return Tokenizer.from_dir(folder), transformers.AutoTokenizer.from_pretrained(str(folder)), folder


def _ids(out) -> list[int]:
    """transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x a list."""
    return list(out["input_ids"] if not isinstance(out, list) else out)


def _random_ids(tok: Tokenizer, seed: int, n: int = 40, valid_byte_runs: bool = False) -> list[int]:
    """Random ids; with valid_byte_runs, each `<0x..>` pick becomes the byte tokens of a whole character."""
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < n:
        i = rng.randrange(tok.vocab_size)
        if valid_byte_runs and re.fullmatch(r"<0x[0-9A-F]{2}>", tok.id_to_token(i) or ""):
            ids += [tok.token_to_id(f"<0x{b:02X}>") for b in rng.choice("é日€🎉𝔘ß").encode()]
        else:
            ids.append(i)
    return ids


# ---------------------------------------------------------------- encode / decode parity


def test_special_token_attributes_match(pair):
    ours, hf, _ = pair
    assert ours.vocab_size == len(hf)
    assert ours.bos_token_id == hf.bos_token_id
    assert ours.pad_token_id == hf.pad_token_id
    assert hf.eos_token_id in ours.eos_token_ids
    for i in range(ours.vocab_size):
        assert ours.is_special(i) == (hf.decode([i], skip_special_tokens=True) == "" != hf.decode([i])), i


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(pair, add_special_tokens):
    ours, hf, _ = pair
    for text in SAMPLES + CORPUS[:8]:
        expected = hf(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert ours.encode(text, add_special_tokens=add_special_tokens) == expected, text


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(pair, skip):
    ours, hf, _ = pair
    sequences = [hf(t)["input_ids"] for t in SAMPLES] + [_random_ids(ours, seed) for seed in range(20)]
    for ids in sequences:
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids


def test_roundtrip(pair):
    ours, _, _ = pair
    for text in SAMPLES:
        if "<" in text or text.startswith(" ") or not text.strip():
            continue  # special tokens are dropped; SentencePiece decoders strip one leading space
        assert ours.decode(ours.encode(text)) == text


def test_multibyte_characters_span_several_tokens(pair):
    """Sanity check on the fixtures: the detokenizer tests below exercise split characters."""
    ours, _, _ = pair
    pieces = [ours.decode([i]) for i in ours.encode("🎉", add_special_tokens=False)]
    assert sum("\ufffd" in p for p in pieces) == 4  # one token per UTF-8 byte


# ---------------------------------------------------------------- incremental detokenizer


def _stream(tok: Tokenizer, ids: list[int], skip: bool) -> tuple[list[str], str, IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    pieces = [detok.add(i) for i in ids]
    return pieces, detok.flush(), detok


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_detokenizer_never_splits_characters(pair, skip):
    ours, hf, _ = pair
    eos = next(iter(ours.eos_token_ids))
    for text in SAMPLES + CORPUS[:8]:
        ids = ours.encode(text) + [eos]
        pieces, tail, detok = _stream(ours, ids, skip)
        assert not any("\ufffd" in p for p in pieces), (text, pieces)
        assert tail == ""
        assert "".join(pieces) == detok.text == ours.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_detokenizer_random_ids(pair, skip):
    """Arbitrary ids (specials anywhere, broken byte-level UTF-8): pieces + flush equal one full decode."""
    ours, _, _ = pair
    for seed in range(30):
        ids = _random_ids(ours, seed, n=60, valid_byte_runs=True)
        pieces, tail, detok = _stream(ours, ids, skip)
        assert "".join(pieces) + tail == detok.text == ours.decode(ids, skip_special_tokens=skip), ids


def test_incremental_detokenizer_holds_back_then_flushes(pair):
    ours, _, _ = pair
    ids = ours.encode("ok 🎉", add_special_tokens=False)
    detok = IncrementalDetokenizer(ours)
    pieces = [detok.add(i) for i in ids[:-1]]  # the emoji's last byte is missing
    assert "\ufffd" not in "".join(pieces)
    assert detok.flush().endswith("\ufffd")
    assert detok.text == ours.decode(ids[:-1])


def test_incremental_detokenizer_invalid_byte_fallback_run(tmp_path):
    """Documented exception: SentencePiece's ByteFallback turns a whole run of `<0x..>` tokens into one
    U+FFFD per byte when the run is invalid UTF-8, so a stray byte after a complete character also
    "breaks" that character in a one-shot decode. The stream has already emitted the character."""
    tok = Tokenizer.from_dir(build_spm(tmp_path, "legacy"))
    ids = [tok.token_to_id(f"<0x{b:02X}>") for b in "日".encode() + b"\xe4"] + tok.encode("ok", False)
    pieces, tail, detok = _stream(tok, ids, skip=True)
    assert pieces[:4] == ["", "", "日", ""] and tail == "" and detok.text == "日\ufffd ok"
    assert tok.decode(ids) == "\ufffd" * 4 + " ok"


def test_incremental_detokenizer_window_stays_small(pair):
    ours, _, _ = pair
    detok = IncrementalDetokenizer(ours)
    for i in ours.encode(" ".join(CORPUS)):
        detok.add(i)
        assert len(detok._ids) <= 8  # only the last emitted token(s) plus an incomplete character


# ---------------------------------------------------------------- chat templates


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(pair, add_generation_prompt):
    ours, hf, _ = pair
    for messages in CONVERSATIONS:
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
        out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        expected_ids = _ids(out)
        assert ours.encode_chat(messages, add_generation_prompt=add_generation_prompt) == expected_ids


def test_chat_template_kwargs_and_tojson(pair):
    ours, hf, _ = pair
    messages = CONVERSATIONS[1]
    expected = hf.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    rendered = ours.apply_chat_template(messages, tools=TOOLS)
    assert rendered == expected
    if ours.chat_template == GEMMA_STYLE:
        assert '"description": "Météo <today>"' in rendered  # no HTML escaping, no \\u escapes, indent=2
        assert '{"source": "<calc>", "ok": true, "ja": "日本"}' in rendered
        assert rendered.startswith("<s><tools>\n[\n  {\n")
        assert "<start_of_turn>user\nYou are terse. Réponds en français 🇫🇷.\n\nWhat's 2+2?\n" in rendered


def test_chat_template_raise_exception():
    ours = Tokenizer(_tiny_backend(), {"chat_template": GEMMA_STYLE, "bos_token": "<s>"})
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="must alternate"):
        ours.apply_chat_template(bad)
    with pytest.raises(ValueError, match="must alternate"):  # a ValueError too, for API layers
        ours.encode_chat(bad)


def test_strftime_now_and_loopcontrols():
    template = (
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
        "|{{ strftime_now('%Y') }}"
    )
    ours = Tokenizer(_tiny_backend(), {"chat_template": template})
    out = ours.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert out.startswith("a|") and out[2:].isdigit()


def test_chat_template_jinja_file_takes_priority(pair, tmp_path):
    _, _, folder = pair
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "x!"


# ---------------------------------------------------------------- folder handling


def _tiny_backend() -> HFTokenizer:
    tok = HFTokenizer(models.WordLevel({"<s>": 0, "a": 1, "b": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_eos_token_ids_union(tmp_path):
    tok = _tiny_backend()
    _save(tmp_path, tok, {"eos_token": "b"}, {"eos_token_id": [1, 2]}, {"eos_token_id": 3})
    ours = Tokenizer.from_dir(tmp_path)
    assert ours.eos_token_ids == frozenset({1, 2, 3})
    assert ours.bos_token_id is None and ours.pad_token_id is None


def test_bytelevel_eos_ids_come_from_all_three_files(tmp_path):
    ours = Tokenizer.from_dir(build_bytelevel(tmp_path))
    assert ours.eos_token_ids == {ours.token_to_id("<|im_end|>"), ours.token_to_id("<|end_of_text|>"), 7}


def test_no_chat_template_raises(tmp_path):
    _save(tmp_path, _tiny_backend(), {})
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "a"}])


def test_only_tokenizer_json_is_required(tmp_path):
    _tiny_backend().save(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer.from_dir(tmp_path)
    assert ours.encode("a b") == [1, 2] and ours.eos_token_ids == frozenset() and ours.chat_template is None


def test_missing_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
