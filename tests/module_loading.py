"""Load a module from a file path: benchmark scripts under test, and private copies of Triton
kernel modules under Triton's interpreter (CPU)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType


def load_module(path: Path, module_name: str) -> ModuleType:
    """Execute the file at `path` as a module named `module_name` (registered in sys.modules,
    where dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def load_interpreted(path: Path, module_name: str) -> ModuleType:
    """A separate copy of the module at `path` whose @triton.jit kernels are InterpretedFunctions;
    the process-wide module (and other tests) are unaffected."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # read by @triton.jit when the module is executed
    try:
        return load_module(path, module_name)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
