"""Reads a Hugging Face `config.json` into the few numbers the model classes need.

Both layouts Hugging Face writes are read: the flat one of older checkpoints (`rope_theta`,
`rope_scaling`, Gemma 3's `rope_local_base_freq`, no `layer_types`) and transformers 5's
(`rope_parameters`, per layer type for Gemma 3; `layer_types`). Where a key is absent, the
family's default in transformers applies (e.g. Gemma 2 alternates sliding and full layers,
Gemma 3 has five sliding layers to one full).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class ModelLoadError(ValueError):
    """A model folder that cannot be served; the message names what is wrong."""


@dataclass(frozen=True)
class ModelArgs:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    hidden_act: str
    attention_bias: bool  # q/k/v (and o, except on Qwen2) projections carry a bias
    o_proj_bias: bool
    mlp_bias: bool
    sliding_windows: tuple[int | None, ...]  # per layer; None = full attention
    torch_dtype: str | None
    eos_token_ids: tuple[int, ...]
    # multiplies q.k; None = head_dim ** -0.5 (Gemma 2/3: query_pre_attn_scalar ** -0.5)
    attention_scale: float | None = None
    attn_logit_softcap: float | None = None  # Gemma 2: scores -> tanh(s / cap) * cap
    final_logit_softcap: float | None = None  # Gemma 2: logits -> tanh(l / cap) * cap
    # Gemma 3: RoPE of the sliding layers (the full layers use rope_theta / rope_scaling); None = same for all
    local_rope_theta: float | None = None
    local_rope_scaling: dict | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def projection_shape(self, projection: str) -> tuple[int, int]:
        """(in_features, out_features) of an HF projection (q_proj … down_proj) of this model."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size), "k_proj": (h, self.kv_size), "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }[projection]


def _require(cfg: dict, key: str, path: Path):
    if key not in cfg:
        raise ModelLoadError(f"{path}: config.json has no '{key}'")
    return cfg[key]


_GEMMA3 = ("gemma3_text", "gemma3")
_TIED_BY_DEFAULT = ("gemma", "gemma2", *_GEMMA3)  # HF's per-family default of tie_word_embeddings


def _sliding_windows(cfg: dict, num_layers: int) -> tuple[int | None, ...]:
    model_type = cfg.get("model_type")
    # transformers' default window where the key is absent (an explicit null stays null)
    window = cfg.get("sliding_window", 4096 if model_type in ("qwen3", "gemma2", *_GEMMA3) else None)
    if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        window = None
    if not window:
        return (None,) * num_layers
    window = int(window)
    layer_types = cfg.get("layer_types")
    if layer_types:
        if len(layer_types) != num_layers:
            raise ModelLoadError(f"config.json 'layer_types' names {len(layer_types)} layers, not {num_layers}")
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if model_type in ("qwen2", "qwen3"):  # sliding only from max_window_layers on
        first = cfg.get("max_window_layers", num_layers)
        return tuple(window if i >= first else None for i in range(num_layers))
    if model_type == "gemma2":  # even layers slide
        return tuple(window if i % 2 == 0 else None for i in range(num_layers))
    if model_type in _GEMMA3:  # every `sliding_window_pattern`-th layer is full
        pattern = int(cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6)))
        return tuple(window if (i + 1) % pattern else None for i in range(num_layers))
    return (window,) * num_layers


def _rope(cfg: dict) -> tuple[float, dict | None, float | None, dict | None]:
    """(theta, scaling) of the full-attention layers, then of the sliding ones (None, None: the same)."""
    gemma3 = cfg.get("model_type") in _GEMMA3
    params = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    if isinstance(params.get("full_attention"), dict):  # transformers 5, per layer type
        full, local = params["full_attention"], params.get("sliding_attention") or {}
        return (float(full.get("rope_theta", 1e6 if gemma3 else 1e4)), full,
                float(local.get("rope_theta", 1e4)) if gemma3 or local else None, local if local else None)
    theta, scaling = cfg.get("rope_theta"), cfg.get("rope_scaling")
    if theta is None and params:
        theta, scaling = params.get("rope_theta"), scaling or params
    theta = float(theta if theta is not None else (1e6 if gemma3 else 1e4))
    if gemma3:  # rope_scaling applies to the full layers only
        return theta, scaling, float(cfg.get("rope_local_base_freq", 1e4)), None
    return theta, scaling, None, None


def _gemma2_default(cfg: dict, key: str, default):
    """Gemma 2/3 keys with transformers' defaults when absent (an explicit null stays None); other
    families do not use them (None)."""
    if cfg.get("model_type") not in ("gemma2", *_GEMMA3):
        return None
    if key in cfg:
        return cfg[key]
    return default if cfg.get("model_type") == "gemma2" or key == "query_pre_attn_scalar" else None


def read_model_args(model_dir: str | Path) -> ModelArgs:
    path = Path(model_dir)
    config_file = path / "config.json"
    if not path.is_dir():
        raise ModelLoadError(f"model folder {path} does not exist")
    if not config_file.is_file():
        raise ModelLoadError(f"{path}: no config.json")
    try:
        cfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{config_file}: not valid JSON ({e})") from None
    architectures = cfg.get("architectures") or []
    if not architectures:
        raise ModelLoadError(f"{config_file}: no 'architectures' entry")
    hidden = int(_require(cfg, "hidden_size", path))
    heads = int(_require(cfg, "num_attention_heads", path))
    layers = int(_require(cfg, "num_hidden_layers", path))
    rope_theta, rope_scaling, local_theta, local_scaling = _rope(cfg)
    if cfg.get("use_bidirectional_attention"):
        raise ModelLoadError(f"{config_file}: bidirectional attention (use_bidirectional_attention) is not supported")
    model_type = cfg.get("model_type", "")
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    pre_attn = _gemma2_default(cfg, "query_pre_attn_scalar", 256)
    attn_cap = _gemma2_default(cfg, "attn_logit_softcapping", 50.0)
    final_cap = _gemma2_default(cfg, "final_logit_softcapping", 30.0)
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    return ModelArgs(
        architecture=architectures[0],
        model_type=cfg.get("model_type", ""),
        vocab_size=int(_require(cfg, "vocab_size", path)),
        hidden_size=hidden,
        intermediate_size=int(_require(cfg, "intermediate_size", path)),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        # HF's per-family default: Gemma ties unless told otherwise, the others do not
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", model_type in _TIED_BY_DEFAULT)),
        # Gemma 2/3 run `hidden_activation` (some configs carry a stale `hidden_act` beside it)
        hidden_act=(cfg.get("hidden_activation") if model_type in ("gemma2", *_GEMMA3) else None)
        or cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu",
        attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
        o_proj_bias=cfg.get("model_type") != "qwen2" and bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        sliding_windows=_sliding_windows(cfg, layers),
        torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
        eos_token_ids=eos_ids,
        attention_scale=float(pre_attn) ** -0.5 if pre_attn else None,
        attn_logit_softcap=float(attn_cap) if attn_cap else None,
        final_logit_softcap=float(final_cap) if final_cap else None,
        local_rope_theta=local_theta,
        local_rope_scaling=local_scaling,
    )
