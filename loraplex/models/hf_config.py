"""Reads a Hugging Face `config.json` into the few numbers the model classes need."""

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


def _sliding_windows(cfg: dict, num_layers: int) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    if cfg.get("model_type") == "qwen2" and not cfg.get("use_sliding_window", False):
        window = None
    if not window:
        return (None,) * num_layers
    layer_types = cfg.get("layer_types")
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if cfg.get("model_type") == "qwen2":  # sliding only from max_window_layers on
        first = cfg.get("max_window_layers", num_layers)
        return tuple(window if i >= first else None for i in range(num_layers))
    return (int(window),) * num_layers


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
    rope_scaling = cfg.get("rope_scaling")
    rope_theta = cfg.get("rope_theta")
    if rope_theta is None and isinstance(cfg.get("rope_parameters"), dict):
        rope_theta = cfg["rope_parameters"].get("rope_theta")
        rope_scaling = rope_scaling or cfg["rope_parameters"]
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
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        # HF's per-family default: Gemma ties unless told otherwise, the others do not
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", cfg.get("model_type") == "gemma")),
        hidden_act=cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu",
        attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
        o_proj_bias=cfg.get("model_type") != "qwen2" and bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        sliding_windows=_sliding_windows(cfg, layers),
        torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
        eos_token_ids=eos_ids,
    )
