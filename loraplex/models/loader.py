"""Builds a model from a Hugging Face folder: config.json + (sharded) safetensors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from loraplex.models.hf_config import ModelArgs, ModelLoadError, read_model_args
from loraplex.models.layers import PackedLinear
from loraplex.models.registry import model_class

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, args: ModelArgs, device: torch.device) -> torch.dtype:
    """"auto": the checkpoint's dtype on CUDA; float32 on CPU, where half-precision GEMMs are slow."""
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return DTYPES.get(args.torch_dtype or "", torch.bfloat16)
    if dtype not in DTYPES:
        raise ValueError(f"dtype '{dtype}' is not supported ({', '.join(DTYPES)} or auto)")
    return DTYPES[dtype]


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index}: malformed index ({e})") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{model_dir}: shards named in the index are missing: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
        hint = f" (found {pickled}: pickled weights are never loaded; convert them to safetensors)" if pickled else ""
        raise ModelLoadError(f"{model_dir}: no *.safetensors weights{hint}")
    return files


def iter_checkpoint(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (OSError, SafetensorError) as e:
            raise ModelLoadError(f"{file}: unreadable safetensors file ({e})") from None


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(model_dir: str | Path, dtype: str = "auto", device: str = "auto"):
    """Returns (model, args, torch_dtype, torch_device); the model is in eval mode, weights loaded."""
    path = Path(model_dir)
    args = read_model_args(path)
    cls = model_class(args.architecture)
    files = safetensors_files(path)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, args, torch_device)
    with torch.device(torch_device), _default_dtype(torch_dtype):
        model = cls(args)
    model.load_weights(iter_checkpoint(files))
    for module in model.modules():
        if isinstance(module, PackedLinear):
            module.prepack()
    model.eval()
    return model, args, torch_dtype, torch_device
