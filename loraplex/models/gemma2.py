"""Gemma 2: Gemma with "sandwich" norms (the attention and MLP outputs normed again before their
residual adds, and a norm of its own before the MLP).

The rest is config, read into ModelArgs by hf_config: attention scale query_pre_attn_scalar ** -0.5,
attention-logit and final-logit soft-capping, alternating sliding-window and full layers.
The activation is `hidden_activation` as given (tanh-approximated GeLU in every checkpoint).
"""

from __future__ import annotations

from loraplex.models.gemma import GemmaForCausalLM
from loraplex.models.hf_config import ModelArgs


class Gemma2ForCausalLM(GemmaForCausalLM):
    sandwich_norms = True

    @staticmethod
    def activation(args: ModelArgs) -> str:
        return args.hidden_act
