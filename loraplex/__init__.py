"""loraplex: one base model, many tenants' LoRA adapters, served batched together."""

from loraplex.core import RequestOutput, SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput"]


def __getattr__(name: str):
    if name == "LLM":  # imported lazily: it pulls in torch
        from loraplex.llm import LLM

        return LLM
    raise AttributeError(name)
