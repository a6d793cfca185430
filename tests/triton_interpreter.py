"""Load a private copy of a Triton kernel module under Triton's interpreter (CPU)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType


def load_interpreted(path: Path, module_name: str) -> ModuleType:
    """A separate copy of the module at `path` whose @triton.jit kernels are InterpretedFunctions;
    the process-wide module (and other tests) are unaffected."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # read by @triton.jit when the module is executed
    try:
        spec = importlib.util.spec_from_file_location(module_name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    return mod
