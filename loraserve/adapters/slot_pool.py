"""Adapter weights in device memory, in pages set aside once at start-up: making an adapter resident is a copy
into free pages, not an allocation.

A page holds one rank component of one adapter in every layer: for each fused projection (q/k/v as one, gate/up
as one) its A row for each slice, and its B column, scaled, in the slice's own output columns. An adapter of rank
r takes r pages, so adapters of any rank share the pool without padding, and the pool's size is a memory budget,
not a count of adapters. A slot (a resident adapter) is its row of the page table; past its rank the row points
at page 0, which stays zero. Pages are made with `torch.empty`: memory is touched only as adapters fill it.
"""
import torch

from loraserve.adapters.format import BaseModelShape, LoraAdapter
from loraserve.kernels.lora import LoraWeights, prepare_cpu_lora

# Each fused projection of the model and the PEFT targets it holds, in output order.
FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",),
}


def page_bytes(base: BaseModelShape, dtype: torch.dtype) -> int:
    """Bytes of one page: one rank component's A rows and B columns in every layer and projection."""
    elements = sum(len(targets) * base.module_shapes[targets[0]][0]
                   + sum(base.module_shapes[target][1] for target in targets)
                   for targets in FUSED_PROJECTIONS.values())
    return elements * base.num_layers * torch.empty((), dtype=dtype).element_size()


class SlotPool:
    """`layer_weights[layer][projection]` is what the model's layers read; `write` and `clear` fill slots, with
    pages from `take_pages`."""

    def __init__(self, base: BaseModelShape, num_slots: int, num_pages: int, max_rank: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.num_slots, self.max_rank = num_slots, max_rank
        self.slot_pages = torch.zeros(num_slots, max_rank, dtype=torch.int64, device=device)
        self.layer_weights: list[dict[str, LoraWeights]] = [
            {projection: _allocate(base, targets, num_pages + 1, self.slot_pages, device, dtype)
             for projection, targets in FUSED_PROJECTIONS.items()}
            for _ in range(base.num_layers)
        ]
        self._free_pages = list(range(num_pages, 0, -1))  # page 0 is the zero page

    @property
    def num_free_pages(self) -> int:
        return len(self._free_pages)

    def take_pages(self, count: int) -> list[int]:
        assert count <= len(self._free_pages), f"{count} pages asked for, {len(self._free_pages)} free"
        taken = self._free_pages[-count:]
        del self._free_pages[-count:]
        return taken

    def return_pages(self, pages: list[int]) -> None:
        self._free_pages.extend(pages)

    def write(self, slot: int, pages: list[int], adapter: LoraAdapter) -> None:
        """Copy the adapter into `pages` (one per rank component) and point the slot at them. The first write on
        the CPU starts compiling the CPU LoRA kernel in the background, for these projections' shapes."""
        assert len(pages) == adapter.rank <= self.max_rank, f"rank {adapter.rank}, {len(pages)} pages"
        if self.layer_weights[0]["o_proj"].lora_a.device.type == "cpu":
            prepare_cpu_lora(list(self.layer_weights[0].values()))
        index = torch.tensor(pages, device=self.slot_pages.device)
        for layer, projections in enumerate(self.layer_weights):
            for projection, weights in projections.items():
                lora_a, lora_b, adapted = _page_contents(adapter, layer, FUSED_PROJECTIONS[projection], weights)
                weights.lora_a[index] = lora_a.to(weights.lora_a)
                weights.lora_b[index] = lora_b.to(weights.lora_b)
                weights.ranks[slot] = adapter.rank if adapted else 0  # kernels read no more pages than this
        self.slot_pages[slot] = 0
        self.slot_pages[slot, :adapter.rank] = index

    def clear(self, slot: int) -> None:
        """Point the slot at nothing; its pages are the caller's to return."""
        assert 0 <= slot < self.num_slots, f"slot {slot} outside 0..{self.num_slots - 1}"
        self.slot_pages[slot] = 0
        for projections in self.layer_weights:
            for weights in projections.values():
                weights.ranks[slot] = 0


def _page_contents(adapter: LoraAdapter, layer: int, targets: tuple[str, ...], weights: LoraWeights
                   ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One projection's pages of the adapter: A rows [rank, slices, in] and scaled B columns [rank, out], zero
    for the slices it does not adapt; and whether it adapts any."""
    in_features = weights.lora_a.shape[2]
    lora_a = torch.zeros(adapter.rank, len(targets), in_features)
    lora_b = torch.zeros(adapter.rank, weights.lora_b.shape[1])
    adapted = False
    for index, (target, (start, end)) in enumerate(zip(targets, weights.slice_bounds)):
        if (layer, target) in adapter.weights:
            target_a, target_b = adapter.weights[(layer, target)]  # [rank, in], [out, rank]
            lora_a[:, index] = target_a
            lora_b[:, start:end] = target_b.T * adapter.scale
            adapted = True
    return lora_a, lora_b, adapted


def _allocate(base: BaseModelShape, targets: tuple[str, ...], num_pages: int, slot_pages: torch.Tensor,
              device: torch.device, dtype: torch.dtype) -> LoraWeights:
    in_features = base.module_shapes[targets[0]][0]
    slice_sizes = [base.module_shapes[target][1] for target in targets]
    lora_a = torch.empty(num_pages, len(targets), in_features, device=device, dtype=dtype)
    lora_b = torch.empty(num_pages, sum(slice_sizes), device=device, dtype=dtype)
    lora_a[0].zero_()
    lora_b[0].zero_()
    return LoraWeights(lora_a, lora_b, slot_pages, slice_sizes, ranks=[0] * slot_pages.shape[0])
