"""Device slots for LoRA adapters: the stacked weights (bookkeeping lives in adapters/slot_table.py).

A slot holds one adapter's A and B for every layer and projection, zero-padded to the slot rank
R = max_lora_rank. Loading an adapter into a slot is a copy; eviction only forgets the name.
Nothing is reallocated after start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.lora.adapter import LoraAdapter
from loraplex.models.hf_config import ModelArgs
from loraplex.models.llama import PACKED_LINEARS

# the packed linears that take LoRA (all but lm_head) → their HF projections, in shard order
PACKED_TARGETS = {packed: hfs for packed, hfs in PACKED_LINEARS.items() if packed != "lm_head"}


@dataclass
class PackedLoraWeights:
    """One packed linear's slots. a: [S, n_slices * R, in] (the slices' A stacked along the rank
    axis, so one shrink serves fused q/k/v or gate/up); b[i]: [S, N_i, R], a transposed view of
    [S, R, N_i] storage (so that expand streams along N); offsets[i]: where slice i starts in
    the packed output."""

    a: torch.Tensor
    b: list[torch.Tensor]
    offsets: list[int]


class LoraSlots:
    """Owned by the model runner; `load` runs between steps, never during a forward."""

    def __init__(self, args: ModelArgs, num_slots: int, rank: int, dtype: torch.dtype, device: torch.device):
        self.num_slots, self.rank = num_slots, rank
        self.layers: list[dict[str, PackedLoraWeights]] = []
        for _ in range(args.num_layers):
            layer = {}
            for packed, targets in PACKED_TARGETS.items():
                in_features = args.projection_shape(targets[0])[0]
                outs = [args.projection_shape(t)[1] for t in targets]
                layer[packed] = PackedLoraWeights(
                    a=torch.zeros(num_slots, len(targets) * rank, in_features, dtype=dtype, device=device),
                    b=[torch.zeros(num_slots, rank, n, dtype=dtype, device=device).transpose(1, 2) for n in outs],
                    offsets=[sum(outs[:i]) for i in range(len(outs))],
                )
            self.layers.append(layer)
        # per slot: the packed linears its adapter touches (others skip the slot's tokens)
        self.targets: list[frozenset[str]] = [frozenset()] * num_slots

    @property
    def bytes_per_slot(self) -> int:
        """Device memory of one slot (every slot is allocated at full rank, used or not)."""
        total = 0
        for layer in self.layers:
            for weights in layer.values():
                total += weights.a[0].numel() * weights.a.element_size()
                total += sum(b[0].numel() * b.element_size() for b in weights.b)
        return total

    def load(self, slot: int, adapter: LoraAdapter) -> None:
        """Copy `adapter` into `slot` (zero-padding ranks), overwriting what was there. On CUDA
        the copies are asynchronous on the current stream: the caller synchronizes it."""
        touched = set()
        for layer_index, layer in enumerate(self.layers):
            for packed, weights in layer.items():
                weights.a[slot].zero_()
                for i, target in enumerate(PACKED_TARGETS[packed]):
                    weights.b[i][slot].zero_()
                    module = adapter.modules.get((layer_index, target))
                    if module is None:
                        continue
                    a, b = module
                    r = a.shape[0]
                    weights.a[slot, i * self.rank : i * self.rank + r].copy_(a, non_blocking=True)
                    weights.b[i][slot, :, :r].copy_(b, non_blocking=True)
                    touched.add(packed)
        self.targets[slot] = frozenset(touched)
