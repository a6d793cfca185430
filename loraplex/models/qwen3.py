"""Qwen 3: the Llama decoder with per-head RMSNorms of q and k (`q_norm`, `k_norm`) before RoPE.

Everything else is config: no q/k/v bias by default, an explicit head_dim, sliding windows only
with use_sliding_window (from max_window_layers on), as Qwen 2 (see hf_config).
"""

from __future__ import annotations

from loraplex.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
