"""Hugging Face architecture name → model class, imported lazily."""

from __future__ import annotations

import importlib

from loraplex.models.hf_config import ModelLoadError

_ARCHITECTURES = {
    "LlamaForCausalLM": ("loraplex.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("loraplex.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("loraplex.models.llama", "LlamaForCausalLM"),
    "GemmaForCausalLM": ("loraplex.models.gemma", "GemmaForCausalLM"),
    "Qwen3ForCausalLM": ("loraplex.models.qwen3", "Qwen3ForCausalLM"),
    "Gemma2ForCausalLM": ("loraplex.models.gemma2", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("loraplex.models.gemma3", "Gemma3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def model_class(architecture: str) -> type:
    if architecture not in _ARCHITECTURES:
        raise ModelLoadError(
            f"architecture '{architecture}' is not supported; supported: {', '.join(supported_architectures())}"
        )
    module_name, class_name = _ARCHITECTURES[architecture]
    return getattr(importlib.import_module(module_name), class_name)
