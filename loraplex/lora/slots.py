"""Device slots for LoRA adapters: the stacked weights (bookkeeping lives in slot_table.py).

A slot holds one adapter's A and B for every layer and projection, zero-padded to the slot rank
R = max_lora_rank. Loading an adapter into a slot is a copy; eviction only forgets the name.
Nothing is reallocated after start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.lora.adapter import LoraAdapter
from loraplex.models.hf_config import ModelArgs

# our packed linear → the HF projections stacked in it, in order
PACKED_TARGETS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


@dataclass
class PackedLoraWeights:
    """One packed linear's slots. a: [S, n_slices * R, in] (the slices' A stacked along the rank
    axis, so one shrink serves fused q/k/v or gate/up); b[i]: [S, N_i, R]; offsets[i]: where
    slice i starts in the packed output."""

    a: torch.Tensor
    b: list[torch.Tensor]
    offsets: list[int]


class LoraSlots:
    """Owned by the model runner; `load` runs between steps, never during a forward."""

    def __init__(self, args: ModelArgs, num_slots: int, rank: int, dtype: torch.dtype, device: torch.device):
        self.num_slots, self.rank = num_slots, rank
        shapes = {  # HF projection → (in, out)
            "q_proj": (args.hidden_size, args.q_size),
            "k_proj": (args.hidden_size, args.kv_size),
            "v_proj": (args.hidden_size, args.kv_size),
            "o_proj": (args.q_size, args.hidden_size),
            "gate_proj": (args.hidden_size, args.intermediate_size),
            "up_proj": (args.hidden_size, args.intermediate_size),
            "down_proj": (args.intermediate_size, args.hidden_size),
        }
        self.layers: list[dict[str, PackedLoraWeights]] = []
        for _ in range(args.num_layers):
            layer = {}
            for packed, targets in PACKED_TARGETS.items():
                in_features = shapes[targets[0]][0]
                outs = [shapes[t][1] for t in targets]
                layer[packed] = PackedLoraWeights(
                    a=torch.zeros(num_slots, len(targets) * rank, in_features, dtype=dtype, device=device),
                    b=[torch.zeros(num_slots, n, rank, dtype=dtype, device=device) for n in outs],
                    offsets=[sum(outs[:i]) for i in range(len(outs))],
                )
            self.layers.append(layer)
        # per slot: the packed linears its adapter touches (others skip the slot's tokens)
        self.targets: list[frozenset[str]] = [frozenset()] * num_slots

    def load(self, slot: int, adapter: LoraAdapter) -> None:
        """Copy `adapter` into `slot` (zero-padding ranks), overwriting what was there."""
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
                    weights.a[slot, i * self.rank : i * self.rank + r].copy_(a)
                    weights.b[i][slot, :, :r].copy_(b)
                    touched.add(packed)
        self.targets[slot] = frozenset(touched)
