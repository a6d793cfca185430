"""Text <-> token ids for a Hugging Face tokenizer folder, chat templates, and streaming detokenization.

`Tokenizer` wraps the `tokenizers` library directly (no transformers at runtime) and reproduces what
`transformers.AutoTokenizer` does for a `tokenizer.json` folder: the same ids from `encode`, the same text
from `decode`, and the same chat-template rendering (a sandboxed jinja2 environment set up the way
transformers sets it up).

tokenizer.json's pipeline is authoritative. transformers 5 does the same for `PreTrainedTokenizerFast`
folders, but for a model-specific `tokenizer_class` (LlamaTokenizer, GemmaTokenizer, ...) it rebuilds the
normalizer/pre-tokenizer/decoder from its own class code, which can give different ids (e.g. Llama-2's
legacy tokenizer.json puts a "▁" after special tokens and keeps extra leading spaces; LlamaTokenizer does not).
"""

from __future__ import annotations

import functools

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend

__all__ = ["ChatTemplateError", "IncrementalDetokenizer", "Tokenizer"]

# The named special tokens transformers knows; any other `*_token` string in tokenizer_config.json
# (e.g. Gemma's "image_token") is a model-specific special token and is treated the same way.
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


class ChatTemplateError(jinja2.TemplateError, ValueError):
    """Raised by a chat template's `raise_exception(msg)`, e.g. for a role the template does not accept."""


# ---------------------------------------------------------------- config helpers


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _added_token(value: Any, special: bool | None = None) -> AddedToken | None:
    """tokenizer_config.json token value (a string or an {"content": ...} dict) -> AddedToken, or None."""
    if isinstance(value, str):
        return AddedToken(value, special=True if special is None else special)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        fields = {k: v for k, v in value.items() if k in _ADDED_TOKEN_FIELDS}
        if special is not None:
            fields["special"] = special
        return AddedToken(**fields)
    return None


def _content(value: Any) -> str | None:
    token = _added_token(value)
    return token.content if token is not None else None


def _int_list(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (only used for non-BPE models that ask for it)."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text


# ---------------------------------------------------------------- chat template environment


def _raise_exception(message: str):
    raise ChatTemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Unlike jinja's own tojson: no HTML escaping, non-ASCII kept, and the json.dumps options exposed.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """jinja's `namespace()`, refusing underscore-prefixed attribute names (as transformers does)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (used for assistant masks in training) and renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _compile_chat_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace)
    return env.from_string(source)


def _prepare_messages(messages: list[dict]) -> list[dict]:
    """As transformers does: drop None-valued keys, and expose a message's reasoning under every common name."""
    prepared = []
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(f"chat messages must be dicts, got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        prepared.append(message)
    return prepared


# ---------------------------------------------------------------- tokenizer


class Tokenizer:
    """A Hugging Face tokenizer folder, behaving like `transformers.AutoTokenizer.from_pretrained(folder)`.

    Attributes:
        vocab_size: number of ids the tokenizer can produce, added tokens included (`len(hf_tokenizer)`).
        bos_token_id, pad_token_id: from tokenizer_config.json's bos/pad tokens (None when unset).
        eos_token_ids: the union of tokenizer_config.json's eos_token and the `eos_token_id` (int or list)
            of config.json and generation_config.json.
        chat_template: the default jinja chat template source, or None.
    """

    def __init__(
        self,
        backend: _Backend,
        tokenizer_config: dict | None = None,
        model_configs: Sequence[dict] = (),
        chat_templates: dict[str, str] | None = None,
    ):
        """Prefer `Tokenizer.from_dir`. `backend` is modified in place (config tokens registered)."""
        config = dict(tokenizer_config or {})
        self._backend = backend
        if config.get("pad_token") is None and backend.padding is not None:  # as transformers does
            config["pad_token"] = backend.padding["pad_token"]
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        named = self._register_config_tokens(config)

        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        # The ids decode(skip_special_tokens=True) drops (the backend's own notion, asked directly).
        self._special_ids = frozenset(
            i for i in backend.get_added_tokens_decoder()
            if backend.decode([i], skip_special_tokens=True) == "" != backend.decode([i], skip_special_tokens=False)
        )
        self._cleanup = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(backend.model).__name__ != "BPE"
            or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))
        )

        self._special_strings = named  # bos_token, eos_token, ... as strings: chat template variables
        self.bos_token_id: int | None = self._token_id(named.get("bos_token"))
        self.pad_token_id: int | None = self._token_id(named.get("pad_token"))
        eos = {self._token_id(named.get("eos_token"))} - {None}
        for model_config in model_configs:
            eos.update(_int_list(model_config.get("eos_token_id")))
            eos.update(_int_list((model_config.get("text_config") or {}).get("eos_token_id")))
        self.eos_token_ids: frozenset[int] = frozenset(eos)

        templates = dict(chat_templates or {})
        raw = config.get("chat_template")
        if isinstance(raw, str):
            templates.setdefault("default", raw)
        elif isinstance(raw, list):  # [{"name": ..., "template": ...}, ...]
            for entry in raw:
                templates.setdefault(entry["name"], entry["template"])
        self._templates = templates
        self.chat_template: str | None = templates.get("default")
        self._compiled: dict[str, jinja2.Template] = {}
        if self.chat_template is not None:
            self._compiled["default"] = _compile_chat_template(self.chat_template)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face model/tokenizer folder.

        Reads tokenizer.json (required), tokenizer_config.json, special_tokens_map.json (legacy),
        chat_template.jinja / additional_chat_templates/*.jinja (which take priority over the config's
        chat_template, as in transformers), config.json and generation_config.json (eos ids).
        """
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"{tokenizer_file} not found: loraplex needs a Hugging Face fast-tokenizer file "
                "(tokenizer.json) in the model folder"
            )
        config = _read_json(path / "tokenizer_config.json")
        if "added_tokens_decoder" not in config:  # legacy folders: the map overrides the config
            config.update(_read_json(path / "special_tokens_map.json"))
        templates = {}
        if (path / "chat_template.jinja").is_file():
            templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
        for extra in sorted((path / "additional_chat_templates").glob("*.jinja")):
            templates[extra.stem] = extra.read_text(encoding="utf-8")
        return cls(
            _Backend.from_file(str(tokenizer_file)),
            config,
            [_read_json(path / "config.json"), _read_json(path / "generation_config.json")],
            templates,
        )

    def _register_config_tokens(self, config: dict) -> dict[str, str]:
        """Add the tokens tokenizer_config.json declares to the backend, the way transformers does.

        Tokens in `added_tokens_decoder` are (re-)added as given; named special tokens
        (bos/eos/unk/pad/..., model-specific `*_token`s, additional/extra special tokens) that are not yet
        added tokens are added as special ones (which makes them unsplittable and skippable in decode).
        Returns the named special tokens as {"bos_token": "<s>", ...}.
        """
        backend = self._backend
        # transformers re-adds every added_tokens_decoder entry (re-adding updates the token's flags).
        decoder = sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0]))
        to_add = [t for t in (_added_token(v) for _, v in decoder) if t is not None]

        # Named special tokens in transformers' order: the standard ones, then model-specific `*_token`s.
        raw_named = {k: config[k] for k in _NAMED_SPECIAL_TOKENS if _content(config.get(k)) is not None}
        raw_named.update({k: v for k, v in config.items() if k.endswith("_token") and _content(v) is not None})
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        if isinstance(extra, dict):  # {"image_token": "<image>", ...}: named, model-specific
            raw_named.update({k: v for k, v in extra.items() if _content(v) is not None})
            extra = []
        named = {k: _content(v) for k, v in raw_named.items()}

        known = {t.content for t in backend.get_added_tokens_decoder().values()} | {t.content for t in to_add}
        for value in [*raw_named.values(), *extra]:
            token = _added_token(value)
            if token is None or token.content in known:
                continue
            if not token.special and token.content in named.values():
                token = _added_token(value, special=True)
            to_add.append(token)
            known.add(token.content)
        if to_add:
            backend.add_tokens(to_add)
        return named

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    # ------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` applies the post-processor (e.g. a leading BOS).
        Releases the GIL while it runs (the batch entry point does; `encode` alone holds it), so a
        long prompt tokenized in a worker thread does not stall the server's event loop."""
        return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    @functools.cached_property
    def max_token_chars(self) -> int:
        """Characters of the longest vocabulary entry: no token stands for more characters of
        text, so a text of N characters has at least N / max_token_chars tokens (byte-level and
        SentencePiece vocabularies spell each character with at least one character)."""
        return max(map(len, self._backend.get_vocab(with_added_tokens=True)), default=1) or 1

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`, identical to transformers' `decode(ids, skip_special_tokens=...)`."""
        text = self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._cleanup else text

    def is_special(self, token_id: int) -> bool:
        """Whether `decode(..., skip_special_tokens=True)` drops this id."""
        return token_id in self._special_ids

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, also when they are not whole UTF-8 characters (a
        byte-level piece, or SentencePiece's `<0xNN>`); special tokens → their text's bytes."""
        text = self.decode([token_id], skip_special_tokens=False)
        if "\ufffd" not in text:
            return text.encode()
        piece = self.id_to_token(token_id) or ""
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        decoder = _byte_level_decoder()
        if piece and all(ch in decoder for ch in piece):
            return bytes(decoder[ch] for ch in piece)
        return text.encode()

    # ------------------------------------------------------------ chat

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs) -> str:
        """Render `messages` with the chat template, as transformers' `apply_chat_template(..., tokenize=False)`.

        Template variables: `messages`, `add_generation_prompt`, `tools` and `documents` (None unless given),
        the special tokens as strings (`bos_token`, `eos_token`, ...), and `template_kwargs` (which win).
        Raises ValueError without a template, ChatTemplateError when the template calls raise_exception.
        """
        name = "tool_use" if template_kwargs.get("tools") is not None and "tool_use" in self._templates else "default"
        if name not in self._templates:
            raise ValueError(
                "this tokenizer has no chat template (no chat_template in tokenizer_config.json and no "
                "chat_template.jinja); pass prompts as plain text instead"
            )
        if name not in self._compiled:
            self._compiled[name] = _compile_chat_template(self._templates[name])
        if not messages:
            raise ValueError("cannot apply a chat template to an empty list of messages")
        variables = {"tools": None, "documents": None, **self._special_strings, **template_kwargs}
        return self._compiled[name].render(
            **variables, messages=_prepare_messages(messages), add_generation_prompt=add_generation_prompt
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs) -> list[int]:
        """Rendered chat -> ids, without the post-processor's special tokens (the template writes them)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **template_kwargs)
        return self.encode(text, add_special_tokens=False)


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character → byte (the inverse of `bytes_to_unicode`)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


# ---------------------------------------------------------------- streaming


class IncrementalDetokenizer:
    """Turns a growing list of generated token ids into text pieces.

    `add(id)` returns the text that became final with that token: never half a UTF-8 character (text is
    held back while the decoded tail ends in U+FFFD). The pieces returned by `add` plus `flush()` join to
    `tokenizer.decode(all_ids, skip_special_tokens)`.

    Each call decodes only a small window: ids[prefix:] against ids[prefix:read], where `prefix..read`
    are tokens already emitted (kept as context, so decoders that treat a sequence's first token specially,
    like Metaspace's leading-space strip, or byte-level merging, see the same neighbourhood as a full
    decode) and `read..` are the tokens not yet emitted. Cost is O(new tokens) per call.

    One exception to the join-equals-decode rule, for invalid output only: SentencePiece's ByteFallback
    decodes a run of `<0x..>` tokens that is not valid UTF-8 as one U+FFFD *per byte*, so a stray byte
    after a complete character retroactively turns that character into U+FFFDs in a one-shot decode.
    The stream has already emitted the character and goes on with the stray byte as one U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.text = ""  # everything emitted so far
        self._ids: list[int] = []  # the window: emitted context, then pending tokens
        self._read = 0  # _ids[:_read] are emitted
        self._prefix_text = ""  # decode(_ids[:_read])

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def add(self, token_id: int) -> str:
        """Append one generated id; return the newly final text ("" while a character is incomplete)."""
        if self.skip_special_tokens and self.tokenizer.is_special(token_id):
            # A skipped token never reaches the decoder, so leaving it out of the window is exact.
            return ""
        self._ids.append(int(token_id))
        new_text = self._decode(self._ids)
        if new_text.endswith("\ufffd"):
            return ""
        return self._emit(new_text)

    def flush(self) -> str:
        """Emit whatever is still held back (an incomplete character decodes to U+FFFD, as in `decode`)."""
        if self._read == len(self._ids):
            return ""
        return self._emit(self._decode(self._ids))

    def _emit(self, new_text: str) -> str:
        if new_text.startswith(self._prefix_text):
            piece = new_text[len(self._prefix_text):]
        else:  # the new tokens changed how the emitted ones decode (see the class docstring)
            piece = self._decode(self._ids[self._read:])
        # The emitted tokens become the context of the next window.
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        self.text += piece
        return piece
