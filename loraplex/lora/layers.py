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
    (None: no adapter in this step) and nothing else writes it."""

    def __init__(self, slots: LoraSlots, device_type: str):
        self.slots = slots
        self.ops = ops.select_backend(device_type)  # chosen once: Triton on CUDA, torch otherwise
        self.batch: LoraBatch | None = None


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Module, packed: str, weights: PackedLoraWeights, runtime: LoraRuntime):
        super().__init__()
        self.base = base
        self.packed = packed
        self.weights = weights
        self.runtime = runtime

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self.runtime.batch
        if batch is None or self.packed not in batch.seg_slots:
            return y
        w = self.weights
        self.runtime.ops.sgmv_lora(x, w.a, w.b, w.offsets, batch.seg_starts, batch.seg_slots[self.packed], y)
        return y


def apply_lora(model: nn.Module, slots: LoraSlots, device_type: str) -> LoraRuntime:
    """Wrap every decoder layer's qkv/o/gate_up/down linear; returns the runtime to drive them."""
    runtime = LoraRuntime(slots, device_type)
    for layer_index, layer in enumerate(model.model.layers):
        for parent in (layer.self_attn, layer.mlp):
            for packed in PACKED_TARGETS:
                base = getattr(parent, packed, None)
                if base is not None:
                    setattr(parent, packed, LoraLinear(base, packed, slots.layers[layer_index][packed], runtime))
    return runtime
