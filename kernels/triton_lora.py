"""Triton LoRA for a batch whose tokens use different adapters: one grouped shrink, one grouped expand.

Tokens are packed by adapter slot (`LoraMapping.packed`), so a program works on rows of a single adapter and
reads that adapter's A or B once per tile. The shrink writes every token's x A^T (all slices' rank blocks side
by side) to a float32 buffer; the expand multiplies each output column by its own slice's rank block of that
buffer and B, scales, and adds into the output. Each token is in one group, so the adds never race. The torch
reference is `kernels.lora.add_lora_reference`.
"""
import torch
import triton
import triton.language as tl

from kernels.lora import LoraMapping, LoraWeights, PaddedLoraMapping


@triton.jit
def _group_rows(sorted_rows, group_starts, group_slots, BLOCK_ROWS: tl.constexpr):
    """This program's adapter slot and its tile of that slot's token rows (axis 0: group, axis 1: row tile)."""
    group = tl.program_id(0)
    start = tl.load(group_starts + group)
    end = tl.load(group_starts + group + 1)
    slot = tl.load(group_slots + group).to(tl.int64)
    packed = start + tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_valid = packed < end
    rows = tl.load(sorted_rows + packed, mask=row_valid, other=0)
    return slot, packed, row_valid, rows


@triton.jit
def _shrink_kernel(
    x, lora_a, shrunk, sorted_rows, group_starts, group_slots,
    in_features, shrunk_width,
    stride_x_row, stride_a_slot, stride_a_row, stride_shrunk_row,
    BLOCK_ROWS: tl.constexpr, BLOCK_RANK: tl.constexpr, BLOCK_IN: tl.constexpr,
):
    slot, packed, row_valid, rows = _group_rows(sorted_rows, group_starts, group_slots, BLOCK_ROWS)
    ranks = tl.program_id(2) * BLOCK_RANK + tl.arange(0, BLOCK_RANK)
    rank_valid = ranks < shrunk_width
    columns = tl.arange(0, BLOCK_IN)

    total = tl.zeros([BLOCK_ROWS, BLOCK_RANK], dtype=tl.float32)
    for column_start in range(0, in_features, BLOCK_IN):
        column = column_start + columns
        column_valid = column < in_features
        x_tile = tl.load(x + rows[:, None] * stride_x_row + column[None, :],
                         mask=row_valid[:, None] & column_valid[None, :], other=0.0)
        a_tile = tl.load(lora_a + slot * stride_a_slot + ranks[None, :] * stride_a_row + column[:, None],
                         mask=rank_valid[None, :] & column_valid[:, None], other=0.0)  # A^T tile
        total += tl.dot(x_tile, a_tile, input_precision="ieee")
    tl.store(shrunk + packed[:, None] * stride_shrunk_row + ranks[None, :], total,
             mask=row_valid[:, None] & rank_valid[None, :])


@triton.jit
def _expand_kernel(
    output, shrunk, lora_b, scales, sorted_rows, group_starts, group_slots, slice_ends,
    out_features, rank,
    stride_output_row, stride_shrunk_row, stride_b_slot, stride_b_row,
    NUM_SLICES: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_OUT: tl.constexpr, RANK_PADDED: tl.constexpr,
):
    slot, packed, row_valid, rows = _group_rows(sorted_rows, group_starts, group_slots, BLOCK_ROWS)
    outs = tl.program_id(2) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    out_valid = outs < out_features
    ranks = tl.arange(0, RANK_PADDED)
    rank_valid = ranks < rank

    # B^T tile: column n of the output uses row n of B, whichever slice n belongs to.
    b_tile = tl.load(lora_b + slot * stride_b_slot + outs[None, :] * stride_b_row + ranks[:, None],
                     mask=out_valid[None, :] & rank_valid[:, None], other=0.0)
    delta = tl.zeros([BLOCK_ROWS, BLOCK_OUT], dtype=tl.float32)
    slice_start = 0
    for index in tl.static_range(NUM_SLICES):
        slice_end = tl.load(slice_ends + index)
        shrunk_tile = tl.load(shrunk + packed[:, None] * stride_shrunk_row + index * rank + ranks[None, :],
                              mask=row_valid[:, None] & rank_valid[None, :], other=0.0)
        in_slice = (outs >= slice_start) & (outs < slice_end)
        product = tl.dot(shrunk_tile.to(b_tile.dtype), b_tile, input_precision="ieee").to(tl.float32)
        delta += tl.where(in_slice[None, :], product, 0.0)
        slice_start = slice_end

    scale = tl.load(scales + slot)
    pointers = output + rows[:, None] * stride_output_row + outs[None, :]
    mask = row_valid[:, None] & out_valid[None, :]
    current = tl.load(pointers, mask=mask, other=0.0).to(tl.float32)
    tl.store(pointers, (current + delta * scale).to(output.dtype.element_ty), mask=mask)


def add_lora_triton(output: torch.Tensor, x: torch.Tensor, weights: LoraWeights,
                    mapping: LoraMapping | PaddedLoraMapping) -> None:
    """Same contract as `kernels.lora.add_lora`: add each token's adapter delta to output [num_tokens, out]."""
    if mapping.empty:
        return
    sorted_rows, group_starts, group_slots = mapping.packed
    slice_ends = weights.slice_ends
    max_group = mapping.max_group_len
    num_tokens, in_features = x.shape
    num_slots, shrunk_width, a_in = weights.lora_a.shape
    out_features, rank = weights.lora_b.shape[1:]
    assert a_in == in_features and output.shape == (num_tokens, out_features)
    assert shrunk_width == len(weights.slice_sizes) * rank and sum(weights.slice_sizes) == out_features
    assert x.stride(1) == 1 and output.stride(1) == 1
    assert weights.lora_a.stride(2) == 1 and weights.lora_b.stride(2) == 1
    num_groups = mapping.num_groups
    block_rows = 16 if max_group <= 16 else 64
    row_tiles = triton.cdiv(max_group, block_rows)

    shrunk = torch.empty(sorted_rows.shape[0], shrunk_width, dtype=torch.float32, device=x.device)
    block_rank = min(64, max(16, triton.next_power_of_2(shrunk_width)))
    _shrink_kernel[(num_groups, row_tiles, triton.cdiv(shrunk_width, block_rank))](
        x, weights.lora_a, shrunk, sorted_rows, group_starts, group_slots,
        in_features, shrunk_width,
        x.stride(0), weights.lora_a.stride(0), weights.lora_a.stride(1), shrunk.stride(0),
        BLOCK_ROWS=block_rows, BLOCK_RANK=block_rank, BLOCK_IN=64,
    )
    block_out = 64
    _expand_kernel[(num_groups, row_tiles, triton.cdiv(out_features, block_out))](
        output, shrunk, weights.lora_b, weights.scales, sorted_rows, group_starts, group_slots, slice_ends,
        out_features, rank,
        output.stride(0), shrunk.stride(0), weights.lora_b.stride(0), weights.lora_b.stride(1),
        NUM_SLICES=len(weights.slice_sizes),
        BLOCK_ROWS=block_rows, BLOCK_OUT=block_out, RANK_PADDED=max(16, triton.next_power_of_2(rank)),
    )
