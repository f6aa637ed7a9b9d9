"""LoRA for a batch where every token may use a different adapter: y += (x A_i^T) (s_i B_i)^T.

Adapter weights live in pages: a page holds one rank component of one adapter (its A row for each slice of a
fused projection, and the matching B column, scaled), so adapters of any rank share one pool with no padding, and
a slot (a resident adapter) is the list of its pages. Tokens are grouped by slot once per step (`LoraMapping`).
`add_lora` dispatches: grouped Triton kernels on CUDA, the grouped C++ kernel on the CPU (`cpu_lora.py`); the
per-slot reference here is what both are tested against, and what the CPU runs until its kernel is built.
"""
from dataclasses import dataclass, field
from functools import cached_property

import torch

from loraserve.kernels.cpu_lora import KERNEL


@dataclass
class LoraWeights:
    """One projection's adapter pages, and the page table every projection shares."""

    lora_a: torch.Tensor  # [num_pages, num_slices, in_features]: slice i's A row of the page's rank component
    lora_b: torch.Tensor  # [num_pages, out_features]: slice i's B column in slice i's own columns, times the scale
    slot_pages: torch.Tensor  # [num_slots, max_rank] int64: rank component j of a slot is page slot_pages[slot, j]
    slice_sizes: list[int]  # output columns of each slice, in order (q, k, v), (gate, up) or one
    ranks: list[int]  # each slot's rank in this projection: 0 if empty or not adapted here
    rank_table: torch.Tensor | None = None  # the same as int32 on the CPU, for the C++ kernel; kept in step by
    # the slot pool, or made from `ranks` when not given
    scale_pages: torch.Tensor | None = None  # [num_slots] int64 on the CPU: the page whose B part holds a DoRA
    # slot's column scales (g - 1), 0 for other slots; one tensor for every projection and layer

    def __post_init__(self) -> None:
        if self.rank_table is None:
            self.rank_table = torch.tensor(self.ranks, dtype=torch.int32)

    @property
    def max_rank(self) -> int:
        return self.slot_pages.shape[1]

    def largest_rank(self, slots: list[int]) -> int:
        """The largest rank among `slots`: kernels read no more pages than this per token."""
        return max(self.ranks[slot] for slot in slots)

    @cached_property
    def slice_bounds(self) -> list[tuple[int, int]]:
        """Each slice's output columns, [start, end)."""
        ends = [sum(self.slice_sizes[:index + 1]) for index in range(len(self.slice_sizes))]
        return list(zip([0] + ends[:-1], ends))

    @cached_property
    def slice_ends(self) -> torch.Tensor:
        """[num_slices] int32 on the weights' device: cumulative slice sizes, made once for the kernels."""
        return torch.tensor(self.slice_sizes, dtype=torch.int32).cumsum(0).int().to(self.lora_b.device)


@dataclass
class LoraMapping:
    """Which tokens of the flat batch use which slot; tokens with no adapter are in no group."""

    groups: list[tuple[int, torch.Tensor]]  # (slot, row indices of its tokens), one entry per active slot
    _scaled: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_token_slots(cls, token_slots: list[int], device: torch.device) -> "LoraMapping":
        """token_slots: one slot per token, -1 for none."""
        rows_by_slot: dict[int, list[int]] = {}
        for row, slot in enumerate(token_slots):
            if slot >= 0:
                rows_by_slot.setdefault(slot, []).append(row)
        groups = [(slot, torch.tensor(rows, dtype=torch.int64, device=device))
                  for slot, rows in sorted(rows_by_slot.items())]
        return cls(groups)

    @property
    def empty(self) -> bool:
        return not self.groups

    def scaled(self, scale_pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rows of tokens whose slot has DoRA column scales, and each row's scale page; None if no slot does.
        Worked out at the first projection of a step, which every other one shares."""
        if self._scaled is None:
            device = self.groups[0][1].device if self.groups else torch.device("cpu")
            pages = scale_pages[[slot for slot, _ in self.groups]].tolist() if self.groups else []
            scaled = [(rows, page) for (_, rows), page in zip(self.groups, pages) if page]
            rows = torch.cat([rows for rows, _ in scaled]) if scaled else torch.empty(0, dtype=torch.int64)
            counts = torch.tensor([rows.shape[0] for rows, _ in scaled], dtype=torch.int64)
            repeated = torch.tensor([page for _, page in scaled], dtype=torch.int64).repeat_interleave(counts)
            self._scaled = (rows.to(device), repeated.to(device))
        return self._scaled if self._scaled[0].numel() else None

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def max_group_len(self) -> int:
        return max(rows.shape[0] for _, rows in self.groups)

    @cached_property
    def packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The groups flattened once per step for the kernels: token rows sorted by group, group start offsets
        into them ([num_groups + 1] int32) and each group's slot ([num_groups] int32)."""
        device = self.groups[0][1].device
        sorted_rows = torch.cat([rows for _, rows in self.groups])
        starts = torch.tensor([0] + [rows.shape[0] for _, rows in self.groups]).cumsum(0).int().to(device)
        slots = torch.tensor([slot for slot, _ in self.groups], dtype=torch.int32).to(device)
        return sorted_rows, starts, slots


@dataclass
class PaddedLoraMapping:
    """The kernels' packed mapping at fixed shapes, for CUDA graphs: room for `capacity` tokens and as many groups
    (empty ones at the end). A graph captured over it reads whatever `fill` last wrote into its tensors."""

    sorted_rows: torch.Tensor  # [capacity] int64: token rows sorted by slot; only the first group_starts[-1] count
    group_starts: torch.Tensor  # [capacity + 1] int32
    group_slots: torch.Tensor  # [capacity] int32
    empty = False  # not a field: a graph runs the LoRA kernels whether or not a step uses adapters

    @classmethod
    def allocate(cls, capacity: int, device: torch.device) -> "PaddedLoraMapping":
        return cls(torch.zeros(capacity, dtype=torch.int64, device=device),
                   torch.zeros(capacity + 1, dtype=torch.int32, device=device),
                   torch.zeros(capacity, dtype=torch.int32, device=device))

    def prefix(self, capacity: int) -> "PaddedLoraMapping":
        """The same tensors seen with room for fewer tokens and groups (a smaller graph's view)."""
        return PaddedLoraMapping(self.sorted_rows[:capacity], self.group_starts[:capacity + 1],
                                 self.group_slots[:capacity])

    def fill(self, token_slots: list[int]) -> None:
        """Point the groups at the tokens of a new step (one slot per token, -1 for none); the groups past the
        step's distinct slots are left empty."""
        rows = sorted((slot, row) for row, slot in enumerate(token_slots) if slot >= 0)
        slots = sorted({slot for slot, _ in rows})
        counts = [sum(1 for slot, _ in rows if slot == group_slot) for group_slot in slots]
        starts = torch.tensor([0] + counts).cumsum(0)
        self.group_starts.copy_(torch.cat([starts, starts[-1:].expand(self.num_groups - len(slots))]))
        self.group_slots[:len(slots)].copy_(torch.tensor(slots, dtype=torch.int32))
        if rows:
            self.sorted_rows[:len(rows)].copy_(torch.tensor([row for _, row in rows]))

    @property
    def num_groups(self) -> int:
        return self.group_slots.shape[0]

    def scaled(self, scale_pages: torch.Tensor) -> None:
        """None: a step with DoRA slots never replays a graph (the runner runs it eagerly)."""
        return None

    @property
    def max_group_len(self) -> int:
        return self.sorted_rows.shape[0]

    @property
    def packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.sorted_rows, self.group_starts, self.group_slots


def add_lora(output: torch.Tensor, x: torch.Tensor, weights: LoraWeights,
             mapping: LoraMapping | PaddedLoraMapping) -> None:
    """Add every token's adapter delta to output [num_tokens, out_features] in place; x is [num_tokens, in]. A
    padded mapping (CUDA graphs) only ever reaches the Triton path."""
    if output.is_cuda:
        # Imported here so the CPU server never needs a working Triton.
        from loraserve.kernels.triton_lora import add_lora_triton
        add_lora_triton(output, x, weights, mapping)
    else:
        add_lora_cpu(output, x, weights, mapping)


def scale_columns(output: torch.Tensor, weights: LoraWeights, mapping: LoraMapping | PaddedLoraMapping) -> None:
    """DoRA: the rows of tokens whose slot has column scales times 1 + g - 1, column by column, after the LoRA
    delta was added (y = g * (W x + s B A x))."""
    scaled = mapping.scaled(weights.scale_pages) if weights.scale_pages is not None else None
    if scaled is None:
        return
    rows, pages = scaled
    selected = output.index_select(0, rows)
    selected.addcmul_(selected, weights.lora_b.index_select(0, pages).to(selected.dtype))
    output.index_copy_(0, rows, selected)


def add_lora_cpu(output: torch.Tensor, x: torch.Tensor, weights: LoraWeights, mapping: LoraMapping) -> None:
    """Every group in one call of the C++ kernel, reading only the largest rank in use; per-adapter matrix
    products until it is built, or if it cannot be."""
    kernel = KERNEL.get()
    if kernel is None:
        add_groups(output, x, weights, mapping.groups)
        return
    rank = weights.largest_rank([slot for slot, _ in mapping.groups])
    if rank == 0:
        return  # none of these adapters adapts this projection
    sorted_rows, group_starts, group_slots = mapping.packed
    kernel.add_lora_groups(output, x.contiguous(), weights.lora_a, weights.lora_b, weights.slot_pages,
                           weights.rank_table, weights.slice_ends, sorted_rows, group_starts, group_slots, rank)


def add_lora_reference(output: torch.Tensor, x: torch.Tensor, weights: LoraWeights, mapping: LoraMapping) -> None:
    """Plain torch, one adapter at a time: the reference the other paths are tested against."""
    add_groups(output, x, weights, mapping.groups)


def add_groups(output: torch.Tensor, x: torch.Tensor, weights: LoraWeights,
               groups: list[tuple[int, torch.Tensor]]) -> None:
    """Per group: gather its tokens and its pages, shrink per slice, expand into the slice's columns."""
    for slot, rows in groups:
        rank = weights.ranks[slot]
        if rank == 0:
            continue
        pages = weights.slot_pages[slot, :rank]
        # [rank, slices, in], [rank, out], in the inputs' dtype (a quantized base's adapters are held in 16 bits)
        lora_a, lora_b = weights.lora_a[pages].to(x.dtype), weights.lora_b[pages].to(x.dtype)
        inputs = x.index_select(0, rows)
        delta = torch.cat([(inputs @ lora_a[:, index].T) @ lora_b[:, start:end]
                           for index, (start, end) in enumerate(weights.slice_bounds)], dim=1)
        output.index_add_(0, rows, delta)
