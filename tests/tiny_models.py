"""Tiny random Hugging Face models of each supported family, made by the tests themselves."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

FAMILIES = ["llama", "mistral", "qwen2", "gemma", "qwen3", "gemma2", "gemma3"]
VOCAB_SIZE = 300  # 256 byte tokens + specials, padded

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=258,
    initializer_range=0.2,  # spread logits apart so float32 noise cannot flip a greedy choice
)

_FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False, rope_theta=10000.0)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=32, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True)),
    # layer 1 slides (from max_window_layers on); head_dim explicit, not hidden / heads
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        head_dim=32, use_sliding_window=True, sliding_window=8, max_window_layers=1, tie_word_embeddings=False)),
    # sliding then full; scale from query_pre_attn_scalar (not head_dim); caps small enough to bend
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=16, sliding_window=8, query_pre_attn_scalar=24, attn_logit_softcapping=4.0,
        final_logit_softcapping=15.0, tie_word_embeddings=True)),
    # both layer types; the sliding layers' RoPE base apart from the full layers' (linearly scaled)
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=3, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}},
        tie_word_embeddings=True)),
}


def write_byte_tokenizer(folder: Path) -> None:
    """A byte-level BPE with no merges: one token per byte, plus <s> (256), </s> (257), <pad> (258)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<s>", "</s>", "<pad>"])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    tokenizer.save(str(folder / "tokenizer.json"))
    chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": chat_template})
    )


def make_tiny_model(family: str, folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Write a random `family` model (HF format, safetensors) and a tokenizer into `folder`."""
    import transformers

    config_name, model_name, extra = _FAMILY_CONFIGS[family]
    config = getattr(transformers, config_name)(**{**_COMMON, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(dtype).eval()
    with torch.no_grad():  # HF zero-inits Gemma's norm weights (scale 1 + w): make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    write_byte_tokenizer(folder)
    return model


def make_peft_adapter(base, folder: Path, seed: int = 0, **lora_kwargs) -> dict[tuple[int, str], torch.Tensor]:
    """Save a real PEFT adapter for `base` into `folder`; returns (layer, target) → PEFT's delta W."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**lora_kwargs))
    deltas = {}
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                module.lora_B["default"].weight.normal_(0, 0.1)  # PEFT zero-inits B
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                parts = name.split(".")
                deltas[int(parts[parts.index("layers") + 1]), parts[-1]] = module.scaling["default"] * b @ a
    peft_model.save_pretrained(folder)
    return deltas
