"""The Llama decoder, which also serves Mistral (sliding window) and Qwen2 (q/k/v bias) by config.

Gemma, Qwen 3, Gemma 2 and Gemma 3 subclass it with their few deltas (`models/gemma.py`,
`qwen3.py`, `gemma2.py`, `gemma3.py`). Parameter names follow Hugging Face,
except that q/k/v and gate/up are packed into `qkv_proj` and `gate_up_proj` at load.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from loraplex.kvcache.attention import AttentionBatch
from loraplex.models.hf_config import ModelArgs, ModelLoadError
from loraplex.models.layers import Attention, GatedMLP, PackedLinear, RMSNorm, RotaryEmbedding

# our packed linear → the HF projections stacked in it, in shard order
PACKED_LINEARS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
    "lm_head": ("lm_head",),
}
# HF projection → (our packed linear, shard index)
PACKED_PROJECTIONS = {hf: (packed, i) for packed, hfs in PACKED_LINEARS.items() for i, hf in enumerate(hfs)}


class DecoderLayer(nn.Module):
    """Pre-norm residual block. With `family.sandwich_norms` (Gemma 2/3) the attention and MLP
    outputs are normed again before their residual adds (`post_attention_layernorm`,
    `post_feedforward_layernorm`) and the MLP input gets its own `pre_feedforward_layernorm`;
    otherwise `post_attention_layernorm` is the MLP's input norm (Llama)."""

    def __init__(self, args: ModelArgs, layer_index: int, family: type[LlamaForCausalLM]):
        super().__init__()
        offset = family.norm_offset
        self.self_attn = Attention(args, layer_index, offset if family.qk_norm else None)
        self.mlp = GatedMLP(args, family.activation(args))
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, offset)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, offset)
        self.sandwich = family.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, offset)
            self.post_feedforward_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, offset)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: AttentionBatch) -> torch.Tensor:
        if not self.sandwich:
            x = x + self.self_attn(self.input_layernorm(x), rope, batch)
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, batch))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class DecoderStack(nn.Module):
    """HF's `model.*`: embeddings, layers, final norm; the rotary embedding(s)."""

    def __init__(self, args: ModelArgs, family: type[LlamaForCausalLM]):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i, family) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, family.norm_offset)
        self.rotary = RotaryEmbedding(args)
        # Gemma 3: the sliding layers' own RoPE base (and scaling)
        self.local_rotary = (
            RotaryEmbedding(args, args.local_rope_theta, args.local_rope_scaling)
            if args.local_rope_theta is not None else None
        )


class LlamaForCausalLM(nn.Module):
    """The decoder; a family is a subclass that sets these class attributes (and `activation`):

    norm_offset: RMSNorm scales by (norm_offset + weight) in float32 when non-zero (Gemma: 1);
    scales_embeddings: embeddings are multiplied by sqrt(hidden_size) (Gemma);
    qk_norm: per-head RMSNorm of q and k before RoPE (Qwen 3, Gemma 3);
    sandwich_norms: Gemma 2's extra norms around attention and MLP (see DecoderLayer).
    Config-level differences (sliding windows, attention scale, soft-caps, per-layer RoPE) come
    from ModelArgs.
    """

    norm_offset = 0.0
    scales_embeddings = False
    qk_norm = False
    sandwich_norms = False

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = DecoderStack(args, type(self))
        self.lm_head = PackedLinear(args.hidden_size, [args.vocab_size], bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.embed_scale = math.sqrt(args.hidden_size) if self.scales_embeddings else None

    @staticmethod
    def activation(args: ModelArgs) -> str:
        return args.hidden_act

    def attention_layers(self) -> list:
        return [layer.self_attn for layer in self.model.layers]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """input_ids, positions: [T] → hidden states before the final norm, [T, hidden]."""
        x = self.model.embed_tokens(input_ids)
        if self.embed_scale is not None:
            x = x * torch.tensor(self.embed_scale, dtype=torch.float32).to(x.dtype)
        rope = self.model.rotary(positions, x.dtype)
        local_rope = self.model.local_rotary(positions, x.dtype) if self.model.local_rotary is not None else rope
        for layer in self.model.layers:
            x = layer(x, local_rope if layer.self_attn.sliding_window else rope, batch)
        return x

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] (only the rows that sample) → logits [N, vocab] in the model dtype;
        soft-capped (tanh(l / cap) * cap) when the config has a final_logit_softcap (Gemma 2)."""
        logits = self.lm_head(self.model.norm(hidden))
        cap = self.args.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    @torch.no_grad()
    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named checkpoint tensors into the parameters; every parameter must be set once."""
        params = dict(self.named_parameters())
        expected = {name for name in params}
        seen: set[str] = set()
        for name, tensor in tensors:
            if name == "lm_head.weight" and self.args.tie_word_embeddings:
                continue  # tied: some checkpoints store the copy anyway
            if "rotary_emb.inv_freq" in name:
                continue
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in PACKED_PROJECTIONS:
                packed, shard = PACKED_PROJECTIONS[parts[-2]]
                module_name = ".".join(parts[:-2] + [packed])
                target = f"{module_name}.{parts[-1]}"
                if target not in params:
                    raise ModelLoadError(f"checkpoint tensor '{name}' has no place in the model")
                module = self.get_submodule(module_name)
                assert isinstance(module, PackedLinear)
                try:
                    module.load_shard(shard, parts[-1], tensor)
                except ModelLoadError as e:
                    raise ModelLoadError(f"checkpoint tensor '{name}': {e}") from None
                seen.add(f"{target}#{shard}")
                continue
            if name not in params:
                raise ModelLoadError(f"checkpoint tensor '{name}' has no place in the model")
            if tuple(params[name].shape) != tuple(tensor.shape):
                raise ModelLoadError(
                    f"checkpoint tensor '{name}' has shape {tuple(tensor.shape)}, expected {tuple(params[name].shape)}"
                )
            params[name].data.copy_(tensor)
            seen.add(name)
        missing = []
        for name in sorted(expected):
            module_name, _, leaf = name.rpartition(".")
            module = self.get_submodule(module_name)
            if not isinstance(module, PackedLinear):
                missing += [] if name in seen else [name]
                continue
            prefix, _, packed = module_name.rpartition(".")
            for i in range(len(module.shard_sizes)):
                if f"{name}#{i}" not in seen:
                    missing.append(".".join(filter(None, [prefix, PACKED_LINEARS[packed][i], leaf])))
        if missing:
            raise ModelLoadError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")
