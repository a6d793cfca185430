"""SGMV LoRA ops: `sgmv_shrink` (x @ A.T per segment) and `sgmv_expand` (y += h @ B.T).

Backends with identical signatures and semantics (see the "Semantics:" docstrings of
`torch_ops`, the reference): Triton kernels on CUDA, numba kernels on CPU (`cpu_ops`, which
hands large or non-float32 batches to the reference). The engine picks one per device, once,
with `select_backend`. `triton_ops` is only imported on demand, so a CPU deployment never
loads Triton.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from . import cpu_ops, torch_ops


def _triton_ops() -> ModuleType | None:
    try:
        return importlib.import_module(f"{__name__}.triton_ops")
    except ImportError:
        return None


def select_backend(device_type: str | None = None) -> ModuleType:
    """The ops module for `device_type` ("cuda", "cpu", …; None = this machine's best)."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        triton = _triton_ops() if torch.cuda.is_available() else None
        return triton or torch_ops
    return cpu_ops


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


__all__ = ["sgmv_shrink", "sgmv_expand", "select_backend", "backend", "torch_ops", "cpu_ops"]
