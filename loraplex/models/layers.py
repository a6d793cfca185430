"""Building blocks shared by every model family: norms, rotary embedding, packed linears.

All forwards take *flat* token tensors: `[num_tokens, ...]`, the tokens of every sequence in the
step laid end to end (no padding). Attention reads and writes the paged KV cache through the
`AttentionBatch` passed down from the model runner.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from loraplex.kvcache.attention import AttentionBatch, paged_attention
from loraplex.models.hf_config import ModelArgs, ModelLoadError


class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalise in float32, cast back, then scale by `weight`.

    `offset=1.0` gives Gemma's variant, which scales by `(1 + weight)` in float32 before the cast.
    """

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (normed * (self.offset + self.weight.float())).type_as(x)
        return self.weight * normed.to(x.dtype)


def _rope_inv_freq(dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ModelLoadError(f"rope_scaling type '{kind}' is not supported (default, linear, llama3 are)")


class RotaryEmbedding(nn.Module):
    """Neox-style (rotate-half) rotary embedding; cos/sin computed in float32 for each step's positions.

    `theta`/`scaling` default to the model's (`rope_theta`, `rope_scaling`); Gemma 3's sliding
    layers pass their own (`local_rope_theta`, `local_rope_scaling`)."""

    def __init__(self, args: ModelArgs, theta: float | None = None, scaling: dict | None = None):
        super().__init__()
        if theta is None:
            theta, scaling = args.rope_theta, args.rope_scaling
        self.register_buffer("inv_freq", _rope_inv_freq(args.head_dim, theta, scaling), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] → (cos, sin), each [T, 1, head_dim] in `dtype`, shared by every layer."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x: [T, heads, head_dim]."""
    cos, sin = rope
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _onednn_linear_available(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PackedLinear(nn.Module):
    """A linear layer whose output is several HF linears stacked (q|k|v, or gate|up).

    `shard_sizes[i]` is the output width of the i-th packed projection; `load_shard` copies one
    checkpoint tensor into its rows. A single projection is the one-shard case.
    After loading, `prepack()` may move the weight into a CPU-specific layout (see there).
    """

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool):
        super().__init__()
        self.in_features = in_features
        self.shard_sizes = list(shard_sizes)
        self.shard_offsets = [sum(shard_sizes[:i]) for i in range(len(shard_sizes))]
        out = sum(shard_sizes)
        self.weight = nn.Parameter(torch.empty(out, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out), requires_grad=False) if bias else None
        self.packed_weight: torch.Tensor | None = None

    def load_shard(self, index: int, name: str, tensor: torch.Tensor) -> None:
        target = self.weight if name == "weight" else self.bias
        if target is None:
            raise ModelLoadError(f"checkpoint has a '{name}' this layer does not use")
        offset, size = self.shard_offsets[index], self.shard_sizes[index]
        expected = (size, *target.shape[1:])
        if tuple(tensor.shape) != expected:
            raise ModelLoadError(f"shape {tuple(tensor.shape)}, expected {expected}")
        target.data[offset : offset + size].copy_(tensor)

    def prepack(self) -> None:
        """On CPU (float32/bfloat16), reorder the weight once into oneDNN's blocked layout, which
        runs the small-batch GEMMs of decoding about a third faster than the dense weight, and
        drop this module's reference to the dense weight (a tied embedding keeps its own)."""
        if self.weight is None or not _onednn_linear_available(self.weight):
            return
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 32)
        del self.weight
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    """Self-attention over the paged KV cache. `kv_cache` is bound by the model runner.

    Per layer: the sliding window (`args.sliding_windows[layer_index]`), the scale of q.k
    (`args.attention_scale`, default head_dim ** -0.5) and the logit soft-cap (`args.attn_logit_softcap`).
    `qk_norm_offset` not None adds Qwen 3 / Gemma 3's per-head RMSNorms of q and k (`q_norm`,
    `k_norm`, over head_dim, with that RMSNorm offset), applied before the rotary embedding.
    """

    def __init__(self, args: ModelArgs, layer_index: int, qk_norm_offset: float | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.qkv_proj = PackedLinear(args.hidden_size, [args.q_size, args.kv_size, args.kv_size], args.attention_bias)
        self.o_proj = PackedLinear(args.q_size, [args.hidden_size], args.o_proj_bias)
        self.scale = args.attention_scale if args.attention_scale is not None else args.head_dim**-0.5
        self.softcap = args.attn_logit_softcap
        self.sliding_window = args.sliding_windows[layer_index]
        if qk_norm_offset is not None:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps, qk_norm_offset)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps, qk_norm_offset)
        else:
            self.q_norm = self.k_norm = None
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: AttentionBatch) -> torch.Tensor:
        heads = self.qkv_proj(x).view(-1, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        v = heads[:, self.num_heads + self.num_kv_heads :]
        if self.q_norm is None:
            qk = apply_rotary(heads[:, : self.num_heads + self.num_kv_heads], rope)  # q and k in one pass
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        else:
            q = apply_rotary(self.q_norm(heads[:, : self.num_heads]), rope)
            k = apply_rotary(self.k_norm(heads[:, self.num_heads : self.num_heads + self.num_kv_heads]), rope)
        out = paged_attention(q, k, v, self.kv_cache, batch, self.scale, self.sliding_window, self.softcap)
        return self.o_proj(out.reshape(-1, self.num_heads * self.head_dim))


ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class GatedMLP(nn.Module):
    def __init__(self, args: ModelArgs, activation: str):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ModelLoadError(f"activation '{activation}' is not supported ({', '.join(ACTIVATIONS)} are)")
        self.act = ACTIVATIONS[activation]
        self.gate_up_proj = PackedLinear(args.hidden_size, [args.intermediate_size] * 2, args.mlp_bias)
        self.down_proj = PackedLinear(args.intermediate_size, [args.hidden_size], args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)
