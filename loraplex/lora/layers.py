"""`apply_lora(model, slots)`: wraps the model's packed linears so that each adds its LoRA delta.

The base GEMM runs once for every token; then `sgmv_lora` (one SGMV shrink for all slices of a
fused linear at once, one SGMV expand per slice) adds the delta of each token's adapter. Tokens arrive grouped
into per-adapter segments (the model runner orders them); base-only segments cost no LoRA math.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loraplex.lora import ops
from loraplex.lora.ops import cpu_ops
from loraplex.lora.slots import PACKED_TARGETS, LoraSlots, PackedLoraWeights


@dataclass
class LoraBatch:
    """One step's segments. seg_starts: [G+1] int32; seg_slots[packed]: [G] int32, the slot of each
    segment or -1 where it has no adapter touching that packed linear. A packed linear absent
    from seg_slots has no LoRA work this step."""

    seg_starts: torch.Tensor
    seg_slots: dict[str, torch.Tensor]


class LoraRuntime:
    """Shared by every LoraLinear of one model; the model runner sets `batch` before each forward
    (None: no adapter in this step) and nothing else writes it. Each call goes through the
    backend's `sgmv_lora` with the step's segments."""

    def __init__(self, slots: LoraSlots, device_type: str):
        self.slots = slots
        self.ops = ops.select_backend(device_type)  # chosen once: Triton on CUDA, torch otherwise
        self.batch: LoraBatch | None = None

    def bind(self, weights: PackedLoraWeights) -> PackedLoraWeights:
        """What `add_delta` takes for `weights`: made once per linear, when it is wrapped."""
        return weights

    def add_delta(self, packed: str, bound: PackedLoraWeights, x: torch.Tensor, y: torch.Tensor) -> None:
        """y += the LoRA delta of each of x's tokens, for packed linear `packed` (in place)."""
        batch = self.batch
        if batch is None or packed not in batch.seg_slots:
            return
        self.ops.sgmv_lora(x, bound.a, bound.b, bound.offsets, batch.seg_starts, batch.seg_slots[packed], y)


class CpuLoraRuntime(LoraRuntime):
    """float32 on CPU: the arguments of the numba kernel are prepared ahead, so that a call is
    the kernel alone (Python work per call, run with cold caches between the base GEMMs, cost
    about as much as the kernel). Each step's segments are expanded to per-token slots once,
    when `batch` is set; each linear's numpy weight views are made once, in `bind`. The kernels are
    compiled when the runtime is made, not on the first request with an adapter."""

    def __init__(self, slots: LoraSlots, device_type: str):
        super().__init__(slots, device_type)
        cpu_ops.compile_kernels(cpu_ops.kernel_weights(w.a, w.b, w.offsets) for w in slots.layers[0].values())

    @staticmethod
    def supports(slots: LoraSlots) -> bool:
        return all(cpu_ops.kernel_weights(w.a, w.b, w.offsets) is not None for layer in slots.layers for w in layer.values())

    @property
    def batch(self) -> LoraBatch | None:
        return self._batch

    @batch.setter
    def batch(self, batch: LoraBatch | None) -> None:
        self._batch = batch
        if batch is None:
            self._token_slots = {}
            return
        num_tokens = int(batch.seg_starts[-1])
        self._token_slots = {
            packed: cpu_ops.token_slots(batch.seg_starts, slots, num_tokens, self.slots.num_slots)
            for packed, slots in batch.seg_slots.items()
        }

    def bind(self, weights: PackedLoraWeights) -> cpu_ops.KernelWeights:
        return cpu_ops.kernel_weights(weights.a, weights.b, weights.offsets)

    def add_delta(self, packed: str, bound: cpu_ops.KernelWeights, x: torch.Tensor, y: torch.Tensor) -> None:
        slots = self._token_slots.get(packed)
        if slots is not None:
            cpu_ops.lora_delta(x, bound, slots, y)


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Module, packed: str, weights: PackedLoraWeights, runtime: LoraRuntime):
        super().__init__()
        self.base = base
        self.packed = packed
        self.runtime = runtime
        self.bound = runtime.bind(weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        self.runtime.add_delta(self.packed, self.bound, x, y)
        return y


def apply_lora(model: nn.Module, slots: LoraSlots, device_type: str) -> LoraRuntime:
    """Wrap every decoder layer's qkv/o/gate_up/down linear; returns the runtime to drive them."""
    cpu_kernels = device_type == "cpu" and CpuLoraRuntime.supports(slots)
    runtime = (CpuLoraRuntime if cpu_kernels else LoraRuntime)(slots, device_type)
    for layer_index, layer in enumerate(model.model.layers):
        for parent in (layer.self_attn, layer.mlp):
            for packed in PACKED_TARGETS:
                base = getattr(parent, packed, None)
                if base is not None:
                    setattr(parent, packed, LoraLinear(base, packed, slots.layers[layer_index][packed], runtime))
    return runtime
