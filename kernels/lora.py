"""LoRA for a batch where every token may use a different adapter: y += s_i * (x A_i^T) B_i^T.

Adapters live in preallocated slots, stacked and zero-padded to the largest rank, so a fused projection
(q/k/v, gate/up) keeps one shrink matrix per slot with each slice's rank block side by side. Tokens are grouped
by slot once per step (`LoraMapping`). `add_lora` dispatches: grouped Triton kernels on CUDA, compiled
gather-and-reduce kernels on the CPU (`cpu_lora.py`), and the per-slot reference here where neither runs.
"""
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch

from kernels.cpu_lora import COMPILED, GROUP_MATMUL_ROWS


@dataclass
class LoraWeights:
    """One projection's adapter slots."""

    lora_a: torch.Tensor  # [num_slots, num_slices * max_rank, in_features]: slice i's A in rank block i
    lora_b: torch.Tensor  # [num_slots, out_features, max_rank]: slice i's B in its own output rows
    scales: torch.Tensor  # [num_slots] float32: alpha / rank (or alpha / sqrt(rank) with rsLoRA)
    slice_sizes: list[int]  # output columns of each slice, in order (q, k, v), (gate, up) or one
    ranks: list[int] = field(default_factory=list)  # each slot's rank here (0 if empty); [] means all max_rank

    @property
    def max_rank(self) -> int:
        return self.lora_b.shape[2]

    def largest_rank(self, slots: list[int]) -> int:
        """The largest rank among `slots`: kernels that read only that many rows of each slice skip padding."""
        return max(self.ranks[slot] for slot in slots) if self.ranks else self.max_rank

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

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def max_group_len(self) -> int:
        return max(rows.shape[0] for _, rows in self.groups)

    @cached_property
    def tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token with an adapter, once per step: its row, and its slot (int64), sorted by slot."""
        rows = torch.cat([rows for _, rows in self.groups])
        slots = torch.cat([torch.full_like(rows, slot) for slot, rows in self.groups])
        return rows, slots

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
    """The kernels' packed mapping at fixed shapes, for CUDA graphs: a group for every slot (empty ones too) and
    room for `capacity` tokens. A graph captured over it reads whatever `fill` last wrote into its tensors."""

    sorted_rows: torch.Tensor  # [capacity] int64: token rows sorted by slot; only the first group_starts[-1] count
    group_starts: torch.Tensor  # [num_slots + 1] int32
    group_slots: torch.Tensor  # [num_slots] int32: group i is slot i
    empty = False  # not a field: a graph runs the LoRA kernels whether or not a step uses adapters

    @classmethod
    def allocate(cls, num_slots: int, capacity: int, device: torch.device) -> "PaddedLoraMapping":
        return cls(torch.zeros(capacity, dtype=torch.int64, device=device),
                   torch.zeros(num_slots + 1, dtype=torch.int32, device=device),
                   torch.arange(num_slots, dtype=torch.int32, device=device))

    def prefix(self, capacity: int) -> "PaddedLoraMapping":
        """The same tensors seen with room for fewer tokens (a smaller graph's view)."""
        return PaddedLoraMapping(self.sorted_rows[:capacity], self.group_starts, self.group_slots)

    def fill(self, token_slots: list[int]) -> None:
        """Point the groups at the tokens of a new step (one slot per token, -1 for none)."""
        rows = sorted((slot, row) for row, slot in enumerate(token_slots) if slot >= 0)
        counts = torch.bincount(torch.tensor([slot for slot, _ in rows], dtype=torch.int64),
                                minlength=self.num_groups)
        self.group_starts.copy_(torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]))
        if rows:
            self.sorted_rows[:len(rows)].copy_(torch.tensor([row for _, row in rows]))

    @property
    def num_groups(self) -> int:
        return self.group_slots.shape[0]

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
        from kernels.triton_lora import add_lora_triton
        add_lora_triton(output, x, weights, mapping)
    else:
        add_lora_cpu(output, x, weights, mapping)


def prepare_cpu_lora(projections: list[LoraWeights]) -> None:
    """Start compiling the CPU kernel in the background, for these projections' shapes (one layer's), with one
    token and several, at their largest rank and a small one."""
    def warm_up(add_gathered: Callable[..., None]) -> None:
        for weights in projections:
            for num_tokens in (1, 3):
                rows = torch.arange(num_tokens)
                x = torch.zeros(num_tokens, weights.lora_a.shape[2], dtype=weights.lora_a.dtype)
                output = torch.zeros(num_tokens, weights.lora_b.shape[1], dtype=weights.lora_b.dtype)
                for rank in (weights.max_rank, 2):
                    add_gathered(output, x, rows, rows * 0, weights.lora_a, weights.lora_b, weights.scales,
                                 weights.slice_bounds, weights.max_rank, rank)
    COMPILED.start(warm_up)


def add_lora_cpu(output: torch.Tensor, x: torch.Tensor, weights: LoraWeights, mapping: LoraMapping) -> None:
    """Small groups gathered together in one compiled kernel, when there are several; large ones (prefill
    chunks), or all of them when nothing could be compiled, by matrix products."""
    small = [group for group in mapping.groups if group[1].shape[0] < GROUP_MATMUL_ROWS]
    if len(small) < 2 or COMPILED.get() is None:  # one group's matrix products beat a gathered call
        small = []
    add_groups(output, x, weights, [group for group in mapping.groups
                                    if len(small) == 0 or group[1].shape[0] >= GROUP_MATMUL_ROWS])
    if small:
        add_lora_gathered(output, x, weights, LoraMapping(small))


def add_lora_gathered(output: torch.Tensor, x: torch.Tensor, weights: LoraWeights, mapping: LoraMapping) -> None:
    """Every token's delta from the compiled kernel (`cpu_lora.py`), reading only the largest rank in use."""
    rank = weights.largest_rank([slot for slot, _ in mapping.groups])
    if rank == 0:
        return  # none of these adapters adapts this projection
    rows, slots = mapping.tokens
    with torch.inference_mode():
        COMPILED.get()(output, x, rows, slots, weights.lora_a, weights.lora_b, weights.scales, weights.slice_bounds,
                       weights.max_rank, rank)


def add_lora_reference(output: torch.Tensor, x: torch.Tensor, weights: LoraWeights, mapping: LoraMapping) -> None:
    """Plain torch, one adapter at a time: the reference the other paths are tested against."""
    add_groups(output, x, weights, mapping.groups)


def add_groups(output: torch.Tensor, x: torch.Tensor, weights: LoraWeights,
               groups: list[tuple[int, torch.Tensor]]) -> None:
    """Per group: gather its tokens, shrink, expand each slice (only the slot's own rank), scatter-add back."""
    max_rank = weights.max_rank
    for slot, rows in groups:
        rank = weights.largest_rank([slot])
        if rank == 0:
            continue
        inputs = x.index_select(0, rows)
        delta = torch.cat([
            (inputs @ weights.lora_a[slot, index * max_rank:index * max_rank + rank].T) @ lora_b[:, :rank].T
            for index, lora_b in enumerate(weights.lora_b[slot].split(weights.slice_sizes, dim=0))
        ], dim=1)
        output.index_add_(0, rows, delta * weights.scales[slot])
