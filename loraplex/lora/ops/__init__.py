"""SGMV LoRA ops: `sgmv_shrink` (x @ A.T per segment) and `sgmv_expand` (y += h @ B.T).

One backend is picked once, at import: Triton kernels when CUDA and Triton are both usable,
the PyTorch reference otherwise. Both backends have identical signatures and semantics (see
their "Semantics:" docstrings). `torch_ops` and `triton_ops` stay importable for tests;
`triton_ops` is only imported on demand, so a CPU deployment never loads Triton.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from . import torch_ops


def _triton_ops() -> ModuleType | None:
    try:
        return importlib.import_module(f"{__name__}.triton_ops")
    except ImportError:
        return None


def select_backend(device_type: str | None = None) -> ModuleType:
    """The ops module for `device_type` ("cuda", "cpu", …; None = this machine's best)."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda" and torch.cuda.is_available():
        mod = _triton_ops()
        if mod is not None:
            return mod
    return torch_ops


backend: ModuleType = select_backend()
sgmv_shrink = backend.sgmv_shrink
sgmv_expand = backend.sgmv_expand


def __getattr__(name: str):
    if name == "triton_ops":
        mod = _triton_ops()
        if mod is None:
            raise AttributeError("triton_ops: triton is not importable")
        return mod
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["sgmv_shrink", "sgmv_expand", "select_backend", "backend", "torch_ops"]
