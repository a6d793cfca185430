"""Model folders: sharded checkpoints, dtypes, and clear errors for what cannot be served."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from loraplex import LLM, SamplingParams
from loraplex.models.hf_config import ModelLoadError
from loraplex.models.loader import load_model
from tiny_models import make_tiny_model

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, logprobs=True, ignore_eos=True)
PROMPT = [256, 10, 20, 30, 40]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    make_tiny_model("llama", folder)
    return folder


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads_like_single_file(llama_dir, tmp_path):
    sharded = tmp_path / "sharded"
    hf = make_tiny_model("llama", sharded)
    hf.save_pretrained(sharded, safe_serialization=True, max_shard_size="100KB")
    (sharded / "model.safetensors").unlink(missing_ok=True)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    single = LLM(str(llama_dir), dtype="float32", kv_cache_memory=1 << 20).generate([PROMPT], GREEDY)[0]
    shards = LLM(str(sharded), dtype="float32", kv_cache_memory=1 << 20).generate([PROMPT], GREEDY)[0]
    assert shards.token_ids == single.token_ids


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs(llama_dir, dtype):
    llm = LLM(str(llama_dir), dtype=dtype, kv_cache_memory=1 << 20)
    assert llm.engine.dtype == getattr(torch, dtype)
    model = llm.engine.runner.model
    assert all(p.dtype == getattr(torch, dtype) for p in model.parameters())
    assert all(m.packed_weight is None or m.packed_weight.dtype == getattr(torch, dtype) for m in model.modules() if hasattr(m, "packed_weight"))
    out = llm.generate([PROMPT], GREEDY)[0]
    assert len(out.token_ids) == GREEDY.max_tokens
    assert all(torch.isfinite(torch.tensor(out.logprobs)))


def test_auto_dtype_and_device_on_cpu(llama_dir):
    model, _, dtype, device = load_model(llama_dir)
    assert dtype == torch.float32 and device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_unsupported_architecture_is_named(llama_dir, tmp_path):
    folder = copy_model(llama_dir, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="FalconForCausalLM.*not supported.*LlamaForCausalLM") as info:
        load_model(folder)
    from loraplex.models.registry import supported_architectures

    for name in ("Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", *supported_architectures()):
        assert name in str(info.value)


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("no_config", "no config.json"),
        ("bad_json", "not valid JSON"),
        ("no_architectures", "no 'architectures'"),
        ("no_hidden_size", "no 'hidden_size'"),
        ("pickled_only", "pickled weights are never loaded"),
        ("missing_tensor", "missing 1 tensors"),
        ("wrong_shape", "has shape"),
        ("extra_tensor", "has no place in the model"),
        ("truncated", "unreadable safetensors"),
        ("missing_shard", "shards named in the index are missing"),
    ],
)
def test_malformed_folder_gets_a_clear_error(llama_dir, tmp_path, breakage, message):
    from safetensors.torch import load_file, save_file

    folder = copy_model(llama_dir, tmp_path / "m")
    config_file, weights = folder / "config.json", folder / "model.safetensors"
    config = json.loads(config_file.read_text())
    if breakage == "no_config":
        config_file.unlink()
    elif breakage == "bad_json":
        config_file.write_text("{not json")
    elif breakage in ("no_architectures", "no_hidden_size"):
        del config["architectures" if breakage == "no_architectures" else "hidden_size"]
        config_file.write_text(json.dumps(config))
    elif breakage == "pickled_only":
        weights.rename(folder / "pytorch_model.bin")
    elif breakage == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif breakage == "missing_shard":
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}})
        )
    else:
        tensors = load_file(weights)
        if breakage == "missing_tensor":
            del tensors["model.layers.1.mlp.up_proj.weight"]
        elif breakage == "wrong_shape":
            tensors["model.norm.weight"] = torch.ones(3)
        else:
            tensors["model.layers.0.self_attn.extra.weight"] = torch.ones(2)
        save_file(tensors, weights)
    with pytest.raises(ModelLoadError, match=message):
        load_model(folder)


def test_missing_tensor_is_named_by_its_checkpoint_name(llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_model(llama_dir, tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(folder)


def test_gemma_ties_embeddings_when_the_config_is_silent(tmp_path):
    """HF's GemmaConfig defaults tie_word_embeddings to True; checkpoints often omit the key."""
    folder = tmp_path / "gemma"
    make_tiny_model("gemma", folder)
    config = json.loads((folder / "config.json").read_text())
    del config["tie_word_embeddings"]
    (folder / "config.json").write_text(json.dumps(config))
    model, args, _, _ = load_model(folder)
    assert args.tie_word_embeddings


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_num_batched_tokens=0), "max_num_batched_tokens must be a positive integer"),
        (dict(max_num_seqs=-1), "max_num_seqs must be a positive integer"),
        (dict(max_loras=0), "max_loras must be a positive integer"),
        (dict(max_lora_rank=128), "max_lora_rank is at most 64"),
        (dict(block_size=0), "block_size must be a positive integer"),
        (dict(kv_cache_memory=0), "kv_cache_memory must be > 0"),
    ],
)
def test_bad_engine_settings_are_refused(llama_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM(str(llama_dir), **kwargs)
