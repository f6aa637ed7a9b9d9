"""Adapter slots in device memory, allocated once at start-up so activating an adapter is a copy, not an alloc.

The model fuses projections (q/k/v into qkv_proj, gate/up into gate_up_proj), so each slot stacks an adapter's
per-target matrices the way `kernels.lora.LoraWeights` expects: slice i's A in rank block i, its B in the slice's
own output rows; ranks below `max_rank` and untargeted slices stay zero.
"""
import torch

from adapters.format import BaseModelShape, LoraAdapter
from kernels.lora import LoraWeights, prepare_cpu_lora

# Each fused projection of the model and the PEFT targets it holds, in output order.
FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",),
}


class SlotPool:
    """`layer_weights[layer][projection]` is what the model's layers read; `write` and `clear` fill slots."""

    def __init__(self, base: BaseModelShape, num_slots: int, max_rank: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.layer_weights: list[dict[str, LoraWeights]] = [
            {projection: _allocate(base, targets, num_slots, max_rank, device, dtype)
             for projection, targets in FUSED_PROJECTIONS.items()}
            for _ in range(base.num_layers)
        ]

    def write(self, slot: int, adapter: LoraAdapter) -> None:
        """Overwrite the slot with the adapter, zero-padded to max_rank. The first write on the CPU starts
        compiling the CPU LoRA kernel in the background, for these projections' shapes."""
        assert adapter.rank <= self.max_rank, f"rank {adapter.rank} exceeds the pool's {self.max_rank}"
        if self.layer_weights and self.layer_weights[0]["o_proj"].lora_a.device.type == "cpu":
            prepare_cpu_lora(list(self.layer_weights[0].values()))
        self.clear(slot)
        for layer, projections in enumerate(self.layer_weights):
            for projection, weights in projections.items():
                weights.scales[slot] = adapter.scale
                targets = FUSED_PROJECTIONS[projection]
                adapted = any((layer, target) in adapter.weights for target in targets)
                weights.ranks[slot] = adapter.rank if adapted else 0  # kernels read no more rows than this
                output_start = 0
                for index, (target, size) in enumerate(zip(targets, weights.slice_sizes)):
                    if (layer, target) in adapter.weights:
                        lora_a, lora_b = adapter.weights[(layer, target)]
                        rank_start = index * self.max_rank
                        weights.lora_a[slot, rank_start:rank_start + adapter.rank].copy_(lora_a)
                        weights.lora_b[slot, output_start:output_start + size, :adapter.rank].copy_(lora_b)
                    output_start += size

    def clear(self, slot: int) -> None:
        assert 0 <= slot < self.num_slots, f"slot {slot} outside 0..{self.num_slots - 1}"
        for projections in self.layer_weights:
            for weights in projections.values():
                weights.lora_a[slot].zero_()
                weights.lora_b[slot].zero_()
                weights.scales[slot] = 0.0
                weights.ranks[slot] = 0


def _allocate(base: BaseModelShape, targets: tuple[str, ...], num_slots: int, max_rank: int,
              device: torch.device, dtype: torch.dtype) -> LoraWeights:
    in_features = base.module_shapes[targets[0]][0]
    slice_sizes = [base.module_shapes[target][1] for target in targets]
    return LoraWeights(
        lora_a=torch.zeros(num_slots, len(targets) * max_rank, in_features, device=device, dtype=dtype),
        lora_b=torch.zeros(num_slots, sum(slice_sizes), max_rank, device=device, dtype=dtype),
        scales=torch.zeros(num_slots, device=device, dtype=torch.float32),
        slice_sizes=slice_sizes,
        ranks=[0] * num_slots,
    )
