"""Gemma 3 (text): Gemma 2 plus per-head RMSNorms of q and k before RoPE, in Gemma's (1 + w) form.

Config differences, read by hf_config: per-layer `layer_types` (five sliding layers to one full by
default); the sliding layers' own RoPE base (`rope_local_base_freq`, or transformers 5's
`rope_parameters["sliding_attention"]`) while `rope_scaling` applies to the full layers only;
no soft-capping unless the config sets it.
"""

from __future__ import annotations

from loraplex.models.gemma2 import Gemma2ForCausalLM


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    qk_norm = True
