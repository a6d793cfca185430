"""Convert a llama-architecture GGUF file into a plain Hugging Face Llama folder.

`convert_gguf_to_hf(gguf_path, out_dir)` writes into `out_dir` (which must exist):

- `model.safetensors`: every tensor dequantized to float32, under Hugging Face Llama names, in the
  HF `[out_features, in_features]` layout, with llama.cpp's q/k rope permutation undone. There is
  an `lm_head.weight` only when the GGUF has `output.weight`; otherwise the config says
  `tie_word_embeddings: true`.
- `config.json`, `generation_config.json`: a complete `LlamaConfig` dict and the bos/eos/pad ids.
- `tokenizer.json`, `tokenizer_config.json`: the byte-level BPE the GGUF metadata describes, loadable
  with `tokenizers.Tokenizer.from_file`, plus the chat template and special-token strings.

Only `general.architecture == "llama"` with a `gpt2` (byte-level BPE) tokenizer is supported; any
other file raises `ValueError` rather than producing a subtly wrong model.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

# llama.cpp's per-block tensor names -> Hugging Face Llama names ({i} is the layer index).
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# llama.cpp token types (enum llama_token_type).
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Write an HF Llama checkpoint + tokenizer converted from `gguf_path` into `out_dir`.

    Deterministic: the same GGUF always gives byte-identical files. Raises `ValueError` for an
    architecture, tensor or tokenizer kind this converter does not know.
    """
    reader = gguf.GGUFReader(str(gguf_path))
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: only 'llama' GGUF files are supported, got {arch!r}")
    out_dir = Path(out_dir)

    n_head = meta["llama.attention.head_count"]
    tensors = _convert_tensors(reader, n_head, meta.get("llama.attention.head_count_kv", n_head))
    vocab_size = tensors["model.embed_tokens.weight"].shape[0]
    config = _llama_config(meta, tied="lm_head.weight" not in tensors, vocab_size=vocab_size)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out_dir / "config.json", config)
    ids = ("bos_token_id", "eos_token_id", "pad_token_id")
    _write_json(out_dir / "generation_config.json", {k: config[k] for k in ids if config[k] is not None})
    build_tokenizer(meta).save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(meta))


def _metadata(reader: gguf.GGUFReader) -> dict:
    """Every key/value field of the file as plain Python values (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _hf_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; unknown names raise."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{suffix}"
    if len(parts) == 1 and stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    raise ValueError(f"unsupported GGUF tensor {gguf_name!r}")


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rope pairs -> HF's rotate-half halves)."""
    d = w.shape[0]
    return w.reshape(n_head, d // n_head // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def _convert_tensors(reader: gguf.GGUFReader, n_head: int, n_head_kv: int) -> dict[str, np.ndarray]:
    """All tensors dequantized to contiguous float32 arrays in HF layout, keyed by HF name."""
    out = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        # GGUF lists dims innermost-first; HF wants them outermost-first ([out, in] for a matrix).
        values = values.reshape([int(n) for n in reversed(tensor.shape)])
        if name.endswith("self_attn.q_proj.weight"):
            values = _unpermute_rope(values, n_head)
        elif name.endswith("self_attn.k_proj.weight"):
            values = _unpermute_rope(values, n_head_kv)
        out[name] = np.ascontiguousarray(values)
    return out


def _llama_config(meta: dict, tied: bool, vocab_size: int) -> dict:
    """The full HF `LlamaConfig` dict for this file's hyper-parameters."""
    n_head = meta["llama.attention.head_count"]
    hidden = meta["llama.embedding_length"]
    rope_theta = meta.get("llama.rope.freq_base", 10000.0)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": n_head,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", n_head),
        "head_dim": meta.get("llama.rope.dimension_count", hidden // n_head),
        "rms_norm_eps": meta["llama.attention.layer_norm_rms_epsilon"],
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "max_position_embeddings": meta["llama.context_length"],
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer the original model's tokenizer uses, chosen by `tokenizer.ggml.pre`.

    "smollm" (like starcoder) isolates every digit before the GPT-2 split, as SmolLM2's own
    tokenizer.json and llama.cpp do.
    """
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in (None, "default", "gpt2"):
        return byte_level
    raise ValueError(f"unsupported tokenizer.ggml.pre {pre!r}")


def build_tokenizer(meta: dict) -> Tokenizer:
    """The byte-level BPE `Tokenizer` described by a GGUF's `tokenizer.ggml.*` metadata.

    Control tokens become special added tokens, user-defined ones plain added tokens; BOS/EOS are
    added by the post-processor exactly when `tokenizer.ggml.add_bos_token`/`add_eos_token` say so.
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"only byte-level BPE ('gpt2') GGUF tokenizers are supported, got {kind!r}")
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF vocabulary has duplicate tokens")
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tokenizer.decoder = decoders.ByteLevel()

    types = meta.get("tokenizer.ggml.token_type") or []
    tokenizer.add_special_tokens([AddedToken(tokens[i], normalized=False, special=True)
                                  for i, kind in enumerate(types) if kind == _TOKEN_CONTROL])
    tokenizer.add_tokens([AddedToken(tokens[i], normalized=False, special=False)
                          for i, kind in enumerate(types) if kind == _TOKEN_USER_DEFINED])

    prefix, suffix, specials = [], [], []
    for which, side in (("bos", prefix), ("eos", suffix)):
        token_id = meta.get(f"tokenizer.ggml.{which}_token_id")
        if meta.get(f"tokenizer.ggml.add_{which}_token", False) and token_id is not None:
            side.append(tokens[token_id])
            specials.append((tokens[token_id], token_id))

    def template(seq: str, type_id: int) -> list[str]:
        return [f"{t}:{type_id}" for t in prefix] + [f"${seq}:{type_id}"] + [f"{t}:{type_id}" for t in suffix]

    tokenizer.post_processor = processors.TemplateProcessing(
        single=template("A", 0), pair=template("A", 0) + template("B", 1), special_tokens=specials
    )
    return tokenizer


def _tokenizer_config(meta: dict) -> dict:
    """`tokenizer_config.json`: special-token strings, BOS/EOS flags, chat template, max length."""
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": bool(meta.get("tokenizer.ggml.add_space_prefix", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta["llama.context_length"],
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
