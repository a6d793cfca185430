"""config.json of the newer families (Qwen 3, Gemma 2, Gemma 3) in the flat layout of released
checkpoints, read into ModelArgs, against how transformers itself reads the same dict."""

from __future__ import annotations

import json

import pytest
import transformers

from loraplex.models.hf_config import ModelLoadError, read_model_args
from loraplex.models.registry import supported_architectures

SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             head_dim=32, num_hidden_layers=8)
# the keys released checkpoints carry (older transformers: no layer_types, no rope_parameters)
FLAT = {
    "gemma2": ("Gemma2Config", dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", sliding_window=16,
                                    hidden_act="gelu", hidden_activation="gelu_pytorch_tanh", rope_theta=10000.0,
                                    query_pre_attn_scalar=144, attn_logit_softcapping=50.0,
                                    final_logit_softcapping=30.0)),
    "gemma3": ("Gemma3TextConfig", dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text",
                                        sliding_window=16, sliding_window_pattern=3, rope_theta=1000000.0,
                                        rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                                        query_pre_attn_scalar=256, final_logit_softcapping=None,
                                        attn_logit_softcapping=None, hidden_activation="gelu_pytorch_tanh")),
    "qwen3": ("Qwen3Config", dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", sliding_window=16,
                                  use_sliding_window=True, max_window_layers=5, rope_theta=1000000.0,
                                  attention_bias=False, tie_word_embeddings=True)),
}


def write(tmp_path, cfg: dict):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return read_model_args(tmp_path)


def hf_windows(config) -> tuple:
    return tuple(config.sliding_window if t == "sliding_attention" else None for t in config.layer_types)


@pytest.mark.parametrize("family", FLAT)
def test_flat_layout_reads_as_transformers_does(tmp_path, family):
    config_class, keys = FLAT[family]
    cfg = {**SHAPE, **keys}
    args = write(tmp_path, cfg)
    hf = getattr(transformers, config_class)(**cfg)
    assert args.sliding_windows == hf_windows(hf)
    assert args.head_dim == 32 and args.tie_word_embeddings == hf.tie_word_embeddings
    if family == "qwen3":
        assert args.attention_scale is None and args.attn_logit_softcap is None and args.local_rope_theta is None
        assert args.rope_theta == hf.rope_parameters["rope_theta"] and not args.attention_bias
        return
    assert args.hidden_act == "gelu_pytorch_tanh"
    assert args.attention_scale == hf.query_pre_attn_scalar**-0.5
    assert (args.attn_logit_softcap, args.final_logit_softcap) == (hf.attn_logit_softcapping, hf.final_logit_softcapping)
    if family == "gemma3":
        full, local = hf.rope_parameters["full_attention"], hf.rope_parameters["sliding_attention"]
        assert (args.rope_theta, args.local_rope_theta) == (full["rope_theta"], local["rope_theta"])
        assert args.rope_scaling["factor"] == full["factor"] == 8.0 and local["rope_type"] == "default"
        assert args.local_rope_scaling is None


@pytest.mark.parametrize("family", FLAT)
def test_transformers5_layout_reads_the_same(tmp_path, family):
    """The dict transformers 5 writes for the same model (layer_types, rope_parameters) gives the
    same ModelArgs as the flat one."""
    config_class, keys = FLAT[family]
    flat = write(tmp_path, {**SHAPE, **keys})
    saved = getattr(transformers, config_class)(**SHAPE, **keys).to_dict()
    saved["architectures"] = keys["architectures"]
    assert "layer_types" in saved and "rope_parameters" in saved
    new = write(tmp_path, saved)
    fields = ("sliding_windows", "rope_theta", "local_rope_theta", "attention_scale", "attn_logit_softcap",
              "final_logit_softcap", "hidden_act", "tie_word_embeddings", "head_dim")
    assert {f: getattr(new, f) for f in fields} == {f: getattr(flat, f) for f in fields}
    assert (new.rope_scaling or {}).get("factor") == (flat.rope_scaling or {}).get("factor")


def test_family_defaults_when_keys_are_absent(tmp_path):
    """transformers' defaults: Gemma 2 caps 50/30 and scale 256 ** -0.5; Gemma 3 no caps, RoPE 1e6/1e4,
    five sliding layers to one full; Qwen 3 slides nowhere without use_sliding_window."""
    gemma2 = write(tmp_path, {**SHAPE, "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "sliding_window": 8})
    assert (gemma2.attn_logit_softcap, gemma2.final_logit_softcap, gemma2.attention_scale) == (50.0, 30.0, 256**-0.5)
    assert gemma2.sliding_windows == (8, None) * 4 and gemma2.tie_word_embeddings
    gemma3 = write(tmp_path, {**SHAPE, "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
                              "sliding_window": 8})
    assert (gemma3.attn_logit_softcap, gemma3.final_logit_softcap) == (None, None)
    assert (gemma3.rope_theta, gemma3.local_rope_theta) == (1e6, 1e4)
    assert gemma3.sliding_windows == (8,) * 5 + (None,) + (8,) * 2
    qwen3 = write(tmp_path, {**SHAPE, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "sliding_window": 8})
    assert qwen3.sliding_windows == (None,) * 8 and not qwen3.tie_word_embeddings and not qwen3.attention_bias
    for family, (config_class, keys) in FLAT.items():  # no sliding_window key: transformers' 4096
        cfg = {**SHAPE, **{k: v for k, v in keys.items() if k != "sliding_window"}}
        assert write(tmp_path, cfg).sliding_windows == hf_windows(getattr(transformers, config_class)(**cfg))
        assert 4096 in write(tmp_path, cfg).sliding_windows, family


def test_refusals(tmp_path):
    base = {**SHAPE, "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "sliding_window": 8}
    with pytest.raises(ModelLoadError, match="use_bidirectional_attention"):
        write(tmp_path, {**base, "use_bidirectional_attention": True})
    with pytest.raises(ModelLoadError, match="layer_types"):
        write(tmp_path, {**base, "layer_types": ["sliding_attention", "full_attention"]})


def test_new_architectures_are_supported_and_listed_in_the_readme():
    from pathlib import Path

    assert {"Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"} <= set(supported_architectures())
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    listed = readme[readme.index("Supported architectures:"):].split("\n\n")[0]
    assert all(f"`{name}`" in listed for name in supported_architectures())
