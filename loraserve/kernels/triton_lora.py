"""Triton LoRA for a batch whose tokens use different adapters: one grouped shrink, one grouped expand.

Tokens are packed by adapter slot (`LoraMapping.packed`), so a program works on rows of a single adapter and
reads that adapter's pages (through its row of the page table) once per tile. The shrink writes every token's
x A^T, slice by slice, to a float32 buffer; the expand multiplies each output column by its own slice's part of
that buffer and the pages' (already scaled) B, and adds into the output. Each token is in one group, so the adds
never race. The torch reference is `loraserve.kernels.lora.add_lora_reference`.
"""
import torch
import triton
import triton.language as tl

from loraserve.kernels.lora import LoraMapping, LoraWeights, PaddedLoraMapping


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
    x, lora_a, slot_pages, shrunk, sorted_rows, group_starts, group_slots,
    in_features, rank,
    stride_x_row, stride_a_page, stride_a_slice, stride_pages_slot, stride_shrunk_row, stride_shrunk_slice,
    BLOCK_ROWS: tl.constexpr, RANK_PADDED: tl.constexpr, BLOCK_IN: tl.constexpr,
):
    """Axis 2 is the slice: this program's tokens times the slice's A rows of the slot's first `rank` pages."""
    slot, packed, row_valid, rows = _group_rows(sorted_rows, group_starts, group_slots, BLOCK_ROWS)
    index = tl.program_id(2)
    ranks = tl.arange(0, RANK_PADDED)
    rank_valid = ranks < rank
    pages = tl.load(slot_pages + slot * stride_pages_slot + ranks, mask=rank_valid, other=0).to(tl.int64)
    columns = tl.arange(0, BLOCK_IN)

    total = tl.zeros([BLOCK_ROWS, RANK_PADDED], dtype=tl.float32)
    for column_start in range(0, in_features, BLOCK_IN):
        column = column_start + columns
        column_valid = column < in_features
        x_tile = tl.load(x + rows[:, None] * stride_x_row + column[None, :],
                         mask=row_valid[:, None] & column_valid[None, :], other=0.0)
        a_tile = tl.load(lora_a + pages[None, :] * stride_a_page + index * stride_a_slice + column[:, None],
                         mask=rank_valid[None, :] & column_valid[:, None], other=0.0)  # A^T tile
        total += tl.dot(x_tile, a_tile, input_precision="ieee")
    tl.store(shrunk + packed[:, None] * stride_shrunk_row + index * stride_shrunk_slice + ranks[None, :], total,
             mask=row_valid[:, None] & rank_valid[None, :])


@triton.jit
def _expand_kernel(
    output, shrunk, lora_b, slot_pages, sorted_rows, group_starts, group_slots, slice_ends,
    out_features, rank,
    stride_output_row, stride_shrunk_row, stride_shrunk_slice, stride_b_page, stride_pages_slot,
    NUM_SLICES: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_OUT: tl.constexpr, RANK_PADDED: tl.constexpr,
):
    slot, packed, row_valid, rows = _group_rows(sorted_rows, group_starts, group_slots, BLOCK_ROWS)
    outs = tl.program_id(2) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    out_valid = outs < out_features
    ranks = tl.arange(0, RANK_PADDED)
    rank_valid = ranks < rank
    pages = tl.load(slot_pages + slot * stride_pages_slot + ranks, mask=rank_valid, other=0).to(tl.int64)

    # Column n of the output uses the pages' B entry n, whichever slice n belongs to; the scale is in B already.
    b_tile = tl.load(lora_b + pages[:, None] * stride_b_page + outs[None, :],
                     mask=out_valid[None, :] & rank_valid[:, None], other=0.0)
    delta = tl.zeros([BLOCK_ROWS, BLOCK_OUT], dtype=tl.float32)
    slice_start = 0
    for index in tl.static_range(NUM_SLICES):
        slice_end = tl.load(slice_ends + index)
        shrunk_tile = tl.load(shrunk + packed[:, None] * stride_shrunk_row + index * stride_shrunk_slice
                              + ranks[None, :], mask=row_valid[:, None] & rank_valid[None, :], other=0.0)
        in_slice = (outs >= slice_start) & (outs < slice_end)
        product = tl.dot(shrunk_tile.to(b_tile.dtype), b_tile, input_precision="ieee").to(tl.float32)
        delta += tl.where(in_slice[None, :], product, 0.0)
        slice_start = slice_end

    pointers = output + rows[:, None] * stride_output_row + outs[None, :]
    mask = row_valid[:, None] & out_valid[None, :]
    current = tl.load(pointers, mask=mask, other=0.0).to(tl.float32)
    tl.store(pointers, (current + delta).to(output.dtype.element_ty), mask=mask)


def add_lora_triton(output: torch.Tensor, x: torch.Tensor, weights: LoraWeights,
                    mapping: LoraMapping | PaddedLoraMapping) -> None:
    """Same contract as `loraserve.kernels.lora.add_lora`: add each token's adapter delta to output [num_tokens, out]. A
    padded mapping (a CUDA graph) reads every slot's pages up to the largest rank."""
    if mapping.empty:
        return
    if isinstance(mapping, PaddedLoraMapping):
        rank = weights.max_rank
    else:
        rank = weights.largest_rank([slot for slot, _ in mapping.groups])
        if rank == 0:
            return
    sorted_rows, group_starts, group_slots = mapping.packed
    num_tokens, in_features = x.shape
    num_slices, out_features = len(weights.slice_sizes), weights.lora_b.shape[1]
    assert weights.lora_a.shape[1:] == (num_slices, in_features) and output.shape == (num_tokens, out_features)
    assert x.stride(1) == 1 and output.stride(1) == 1
    assert weights.lora_a.stride(2) == 1 and weights.lora_b.stride(1) == 1 and weights.slot_pages.stride(1) == 1
    block_rows = 16 if mapping.max_group_len <= 16 else 64
    grid = (mapping.num_groups, triton.cdiv(mapping.max_group_len, block_rows))
    rank_padded = max(16, triton.next_power_of_2(rank))
    shrunk = torch.empty(sorted_rows.shape[0], num_slices, rank_padded, dtype=torch.float32, device=x.device)
    _shrink_kernel[(*grid, num_slices)](
        x, weights.lora_a, weights.slot_pages, shrunk, sorted_rows, group_starts, group_slots,
        in_features, rank,
        x.stride(0), weights.lora_a.stride(0), weights.lora_a.stride(1), weights.slot_pages.stride(0),
        shrunk.stride(0), shrunk.stride(1),
        BLOCK_ROWS=block_rows, RANK_PADDED=rank_padded, BLOCK_IN=64,
    )
    block_out = 64
    _expand_kernel[(*grid, triton.cdiv(out_features, block_out))](
        output, shrunk, weights.lora_b, weights.slot_pages, sorted_rows, group_starts, group_slots,
        weights.slice_ends, out_features, rank,
        output.stride(0), shrunk.stride(0), shrunk.stride(1), weights.lora_b.stride(0), weights.slot_pages.stride(0),
        NUM_SLICES=num_slices, BLOCK_ROWS=block_rows, BLOCK_OUT=block_out, RANK_PADDED=rank_padded,
    )
