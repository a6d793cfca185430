"""Gemma (1): the Llama decoder with Gemma's deltas.

RMSNorm scales by (1 + weight) in float32, embeddings are multiplied by sqrt(hidden_size),
the MLP uses tanh-approximated GeLU, and head_dim comes from the config (256 on Gemma-2B).
"""

from __future__ import annotations

from loraplex.models.hf_config import ModelArgs
from loraplex.models.llama import LlamaForCausalLM


class GemmaForCausalLM(LlamaForCausalLM):
    norm_offset = 1.0
    scales_embeddings = True

    @staticmethod
    def activation(args: ModelArgs) -> str:
        # Gemma checkpoints say "gelu" but were trained with the tanh approximation (as HF maps it).
        return "gelu_pytorch_tanh" if args.hidden_act in ("gelu", "gelu_pytorch_tanh") else args.hidden_act
