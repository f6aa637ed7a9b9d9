"""Adapter weights in device memory, in pages set aside once at start-up: making an adapter resident is a copy
into free pages, not an allocation.

A page holds one rank component of one adapter in every layer: for each fused projection (q/k/v as one, gate/up
as one) its A row for each slice, and its B column, scaled, in the slice's own output columns. An adapter of rank
r takes r pages, so adapters of any rank share the pool without padding, and the pool's size is a memory budget,
not a count of adapters. A slot (a resident adapter) is its row of the page table; past its rank the row points
at page 0, which stays zero. Pages are made with `torch.empty`: memory is touched only as adapters fill it. A
prompt-learning adapter takes a slot and no pages: its virtual tokens' rows (a few kilobytes to a few megabytes)
sit in `virtual_tokens`, one entry per slot.
"""
from dataclasses import dataclass

import torch

from loraserve.adapters.adapter_info import AdapterInfo, BaseModelShape
from loraserve.adapters.errors import AdapterTooLargeError
from loraserve.adapters.format import Adapter
from loraserve.adapters.lora_format import LoraAdapter
from loraserve.adapters.medusa_format import MedusaWeights
from loraserve.adapters.prompt_learning import PromptLearningAdapter, VirtualTokens
from loraserve.huge_pages import advise_huge_pages
from loraserve.kernels import cpu_adapter_copy, cpu_lora
from loraserve.kernels.lora import LoraWeights

# Each fused projection of the model and the PEFT targets it holds, in output order.
FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",),
}
# The CPU kernels that read the pool (grouped LoRA) and write it (adapter copies).
KERNELS = (cpu_lora.KERNEL, cpu_adapter_copy.KERNEL)
_NONE = torch.empty(0)  # a slice the adapter leaves alone: the copy kernel writes zeros there


def page_bytes(base: BaseModelShape, dtype: torch.dtype) -> int:
    """Bytes of one page: one rank component's A rows and B columns in every layer and projection."""
    elements = sum(len(targets) * base.module_shapes[targets[0]][0]
                   + sum(base.module_shapes[target][1] for target in targets)
                   for targets in FUSED_PROJECTIONS.values())
    return elements * base.num_layers * torch.empty((), dtype=dtype).element_size()


@dataclass
class ProjectionPool:
    """One fused projection's pages in every layer, one tensor each, so an adapter is copied in a few operations
    (each a GIL hand-off that a busy step thread can delay by milliseconds), not a few per layer. Layer-major,
    so in each layer an adapter of consecutive pages is one span of memory, which the kernels stream through
    (page-major, each rank component's rows a layer's stride apart, read at 14 GB/s instead of 19)."""

    lora_a: torch.Tensor  # [layers, pages, slices, in]
    lora_b: torch.Tensor  # [layers, pages, out]
    ranks: torch.Tensor  # [layers, slots] int32 on the CPU: each slot's rank in each layer, 0 where not adapted
    slice_sizes: list[int]

    def layer(self, layer: int, slot_pages: torch.Tensor, scale_pages: torch.Tensor) -> LoraWeights:
        return LoraWeights(self.lora_a[layer], self.lora_b[layer], slot_pages, self.slice_sizes,
                           self.ranks[layer].tolist(), self.ranks[layer], scale_pages)


class SlotPool:
    """`layer_weights[layer][projection]` is what the model's layers read; `write` and `clear` fill slots, with
    pages from `take_pages`."""

    def __init__(self, base: BaseModelShape, num_slots: int, num_pages: int, max_rank: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.num_slots, self.max_rank = num_slots, max_rank
        self.slot_pages = torch.zeros(num_slots, max_rank, dtype=torch.int64, device=device)
        self.scale_pages = torch.zeros(num_slots, dtype=torch.int64)  # a DoRA slot's column-scale page, else 0
        self.virtual_tokens: list[VirtualTokens | None] = [None] * num_slots  # a prompt-learning slot's, else None
        self.medusa_heads: list[MedusaWeights | None] = [None] * num_slots  # the Medusa heads a slot's adapter brought
        self.device, self.dtype = device, dtype
        self.page_size, self.total_pages = page_bytes(base, dtype), num_pages
        self._pools = {projection: _allocate(base, targets, num_pages + 1, num_slots, device, dtype)
                       for projection, targets in FUSED_PROJECTIONS.items()}
        self.layer_weights: list[dict[str, LoraWeights]] = [
            {projection: pool.layer(layer, self.slot_pages, self.scale_pages)
             for projection, pool in self._pools.items()}
            for layer in range(base.num_layers)
        ]
        self._free_pages = list(range(num_pages, 0, -1))  # page 0 is the zero page
        # The Triton kernels read a slot's pages in every layer up to the batch's largest rank; the CPU ones only
        # where the slot's rank in that layer is non-zero (see `_fill_pages`).
        self.writes_every_layer = device.type == "cuda"
        if device.type == "cpu":
            for kernel in KERNELS:  # built or loaded in the background now: the first adapters already use them
                kernel.start()

    @property
    def num_free_pages(self) -> int:
        return len(self._free_pages)

    def take_pages(self, count: int) -> list[int]:
        """The lowest free pages, ascending: mostly one run of consecutive pages, which `write` fills in a few
        strided copies."""
        assert count <= len(self._free_pages), f"{count} pages asked for, {len(self._free_pages)} free"
        if count == 0:
            return []
        taken = self._free_pages[:-count - 1:-1]
        del self._free_pages[-count:]
        return taken

    def return_pages(self, pages: list[int]) -> None:
        self._free_pages.extend(pages)
        self._free_pages.sort(reverse=True)  # a stack with the lowest page on top

    def pages_for(self, info: AdapterInfo) -> int:
        """Pages an adapter takes: its own (`num_pages`), then as many as its Medusa heads fill in the pool's dtype.
        The heads sit beside the pool, but their pages are held with the slot, so --adapter-memory bounds them too."""
        head_bytes = info.medusa_bytes // 4 * self.dtype.itemsize
        pages = info.num_pages + -(-head_bytes // self.page_size)
        if pages > self.total_pages:
            raise AdapterTooLargeError(f"the adapter needs {pages} pages of the adapter pool ({pages - info.num_pages} "
                                       f"for its Medusa heads), more than its {self.total_pages}: --adapter-memory, "
                                       f"at most --max-loras x --max-lora-rank pages")
        return pages

    def write(self, slot: int, pages: list[int], adapter: Adapter) -> None:
        """Copy the adapter into `pages` (one per rank component, then a DoRA adapter's column scales) and point
        the slot at them; a prompt-learning adapter's virtual tokens, and the Medusa heads an adapter brings, go to
        the device beside them."""
        assert len(pages) == self.pages_for(adapter), f"{adapter.info()}, {len(pages)} pages"
        if adapter.medusa_heads is not None:
            self.medusa_heads[slot] = adapter.medusa_heads.to(self.device, self.dtype)
        pages = pages[:adapter.num_pages]  # the rest stand for the heads'
        if isinstance(adapter, PromptLearningAdapter):
            self.virtual_tokens[slot] = adapter.virtual_tokens.to(self.device)
            return
        assert adapter.rank <= self.max_rank, f"{adapter.info()}"
        assert not adapter.magnitudes, "a DoRA adapter's magnitudes are resolved (dora.resolve) before it is placed"
        pages, scale_page = pages[:adapter.rank], pages[adapter.rank] if adapter.use_dora else 0
        index = torch.tensor(pages, device=self.slot_pages.device)
        for projection, pool in self._pools.items():
            if scale_page:
                _write_column_scales(pool, scale_page, adapter, FUSED_PROJECTIONS[projection])
            bounds = self.layer_weights[0][projection].slice_bounds
            ranks = _fill_pages(pool, pages, adapter, FUSED_PROJECTIONS[projection], bounds,
                                only_adapted_layers=not self.writes_every_layer)
            self._set_ranks(projection, slot, [ranks.get(layer, 0) for layer in range(len(self.layer_weights))])
        self.slot_pages[slot] = 0
        self.slot_pages[slot, :adapter.rank] = index
        self.scale_pages[slot] = scale_page

    def clear(self, slot: int) -> None:
        """Point the slot at nothing; its pages are the caller's to return."""
        assert 0 <= slot < self.num_slots, f"slot {slot} outside 0..{self.num_slots - 1}"
        self.slot_pages[slot] = 0
        self.scale_pages[slot] = 0
        self.virtual_tokens[slot] = None
        self.medusa_heads[slot] = None
        for projection in self._pools:
            self._set_ranks(projection, slot, [0] * len(self.layer_weights))

    def _set_ranks(self, projection: str, slot: int, ranks: list[int]) -> None:
        """The slot's rank in each layer (kernels read no more pages than this), as a list and as a tensor."""
        self._pools[projection].ranks[:, slot] = torch.tensor(ranks, dtype=torch.int32)
        for layer, rank in enumerate(ranks):
            self.layer_weights[layer][projection].ranks[slot] = rank


def _fill_pages(pool: ProjectionPool, pages: list[int], adapter: LoraAdapter, targets: tuple[str, ...],
                slice_bounds: list[tuple[int, int]], only_adapted_layers: bool) -> dict[int, int]:
    """Write one projection's pages of the adapter in place: A rows and scaled B columns where it adapts a layer's
    slice, zero elsewhere (and past a module's own rank, when patterns give modules different ranks); returns the
    rank the kernels must read in each layer it adapts (its slices' largest). The CPU kernels read a slot's pages
    only in layers where its rank is non-zero (`only_adapted_layers`), so there pages of layers it does not adapt
    are left untouched (an adapter of q and v writes a fraction of its pages; zeroing the rest was most of a
    load); the Triton kernels read every slot up to the batch's largest rank, so on CUDA every layer is written."""
    num_layers = pool.lora_a.shape[0]
    layers_of = {target: [layer for layer in range(num_layers) if (layer, target) in adapter.weights]
                 for target in targets}
    adapted = set().union(*layers_of.values())
    ranks = {layer: max(adapter.weights[(layer, target)][0].shape[0] for target in targets
                        if (layer, target) in adapter.weights) for layer in adapted}
    if only_adapted_layers and not adapted:
        return ranks
    kernel = cpu_adapter_copy.KERNEL.get() if pool.lora_a.device.type == "cpu" and only_adapted_layers else None
    if kernel is not None:
        starts = [start for start, _ in slice_bounds] + [slice_bounds[-1][1]]
        modules = [(layer, target) for layer in sorted(adapted) for target in targets]
        weights = [adapter.weights.get(module, (_NONE, _NONE)) for module in modules]
        kernel.write_pages(pool.lora_a, pool.lora_b, pages, starts, [layer for layer, _ in modules],
                           [targets.index(target) for _, target in modules], [a for a, _ in weights],
                           [b for _, b in weights], [adapter.scale_of(module) for module in modules])
    else:
        _write_with_torch(pool, pages, adapter, targets, slice_bounds, layers_of,
                          None if only_adapted_layers else list(range(num_layers)))
    return ranks


def _write_column_scales(pool: ProjectionPool, page: int, adapter: LoraAdapter, targets: tuple[str, ...]) -> None:
    """A DoRA adapter's g - 1 for each output column of the projection, in the B part of its scale page, in every
    layer (zero where it does not adapt a slice: those columns are left as they are)."""
    num_layers = pool.lora_b.shape[0]
    zero = {target: torch.zeros(size) for target, size in zip(targets, pool.slice_sizes)}
    scales = torch.stack([torch.cat([adapter.column_scales.get((layer, target), zero[target]) for target in targets])
                          for layer in range(num_layers)])
    pool.lora_b[:, page] = scales.to(pool.lora_b)


def _write_with_torch(pool: ProjectionPool, pages: list[int], adapter: LoraAdapter, targets: tuple[str, ...],
                      slice_bounds: list[tuple[int, int]], layers_of: dict[str, list[int]],
                      every_layer: list[int] | None) -> None:
    """`_fill_pages` in torch operations (CUDA pools, and the CPU's until its copy kernel is built): a run of
    consecutive pages at a time, as strided copies, no page-sized temporaries or element-wise index_put."""
    stacked = {}
    for target, layers in layers_of.items():
        if layers:
            padded = [_padded(adapter, (layer, target)) for layer in layers]
            lora_a = torch.stack([a for a, _ in padded])  # [layers, rank, in]
            scaled = torch.stack([b for _, b in padded])  # [layers, rank, out], scaled in float32
            stacked[target] = (_layer_index(layers), lora_a.to(pool.lora_a), scaled.to(pool.lora_b))
    adapted = sorted(set().union(*layers_of.values()))
    zeroed = _layer_index(every_layer or adapted)
    # Every adapted layer has every slice adapted: each element a kernel reads is written below.
    covered = all(len(layers_of[target]) == len(adapted) for target in targets)
    for offset, first, count in _runs(pages):
        page_a, page_b = pool.lora_a[:, first:first + count], pool.lora_b[:, first:first + count]
        if every_layer or not covered:
            page_a[zeroed] = 0
            page_b[zeroed] = 0
        for slice_index, (target, (start, end)) in enumerate(zip(targets, slice_bounds)):
            if target in stacked:
                layers, lora_a, lora_b = stacked[target]
                page_a[layers, :, slice_index] = lora_a[:, offset:offset + count]
                page_b[layers, :, start:end] = lora_b[:, offset:offset + count]


def _padded(adapter: LoraAdapter, module: tuple[int, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """A module's A [rank, in] and scaled B^T [rank, out] (float32), zero rows past its own rank."""
    lora_a, lora_b = adapter.weights[module]
    missing = adapter.rank - lora_a.shape[0]
    return (torch.nn.functional.pad(lora_a, (0, 0, 0, missing)),
            torch.nn.functional.pad(lora_b.T.float() * adapter.scale_of(module), (0, 0, 0, missing)))


def _layer_index(layers: list[int]) -> slice | torch.Tensor:
    """A slice where the layers are consecutive (the usual case: a plain strided copy), else an index."""
    if layers == list(range(layers[0], layers[-1] + 1)):
        return slice(layers[0], layers[-1] + 1)
    return torch.tensor(layers)


def _runs(pages: list[int]) -> list[tuple[int, int, int]]:
    """(offset in `pages`, first page, count) of each run of consecutive page numbers."""
    runs: list[tuple[int, int, int]] = []
    for offset, page in enumerate(pages):
        if runs and runs[-1][1] + runs[-1][2] == page:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((offset, page, 1))
    return runs


def _allocate(base: BaseModelShape, targets: tuple[str, ...], num_pages: int, num_slots: int,
              device: torch.device, dtype: torch.dtype) -> ProjectionPool:
    in_features = base.module_shapes[targets[0]][0]
    slice_sizes = [base.module_shapes[target][1] for target in targets]
    lora_a = torch.empty(base.num_layers, num_pages, len(targets), in_features, device=device, dtype=dtype)
    lora_b = torch.empty(base.num_layers, num_pages, sum(slice_sizes), device=device, dtype=dtype)
    advise_huge_pages(lora_a)
    advise_huge_pages(lora_b)
    lora_a[:, 0].zero_()
    lora_b[:, 0].zero_()
    ranks = torch.zeros(base.num_layers, num_slots, dtype=torch.int32)
    return ProjectionPool(lora_a, lora_b, ranks, slice_sizes)
