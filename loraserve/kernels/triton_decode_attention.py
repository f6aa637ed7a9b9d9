"""Triton flash-decoding: attention of one query token per sequence, split along the context.

A decode step has one query row per sequence and head, too little work to fill a GPU when contexts are long and
batches small. So the context is cut into partitions: one program per (sequence, KV head, partition) walks its
partition's key/value tiles with an online softmax, for every query head of its group at once (each tile is
loaded once per group), and writes an unnormalised partial result with its running max and sum. A second kernel
merges a sequence's partials. `loraserve.kernels.attention.paged_attention_reference` is the torch reference.
"""
import torch
import triton
import triton.language as tl

from loraserve.kernels.attention import AttentionMetadata
from loraserve.kernels.triton_attention_tile import attend_tile

PARTITION_SIZE = 512  # context positions per program


@triton.jit
def _partition_kernel(
    query, key_cache, value_cache, partial_output, partial_max, partial_sum,
    block_tables, seq_lens,
    stride_query_token, stride_query_head,
    stride_cache_block, stride_cache_slot, stride_cache_head,
    stride_table_seq,
    block_size,
    scale_log2,  # softmax scale times log2(e): the loop uses exp2
    GROUP: tl.constexpr,  # query heads per KV head
    ROWS: tl.constexpr,  # GROUP padded to a power of two, at least 16 for tl.dot
    HEAD_DIM: tl.constexpr,
    DIM_PADDED: tl.constexpr,
    PARTITION: tl.constexpr,
    BLOCK_KEY: tl.constexpr,
):
    sequence = tl.program_id(0)
    kv_head = tl.program_id(1)
    partition = tl.program_id(2)
    num_partitions = tl.num_programs(2)
    num_heads = tl.num_programs(1) * GROUP

    seq_len = tl.load(seq_lens + sequence)
    start = partition * PARTITION
    end = tl.minimum(start + PARTITION, seq_len)

    rows = tl.arange(0, ROWS)
    head = kv_head * GROUP + rows
    row_valid = rows < GROUP
    dims = tl.arange(0, DIM_PADDED)
    dim_valid = dims < HEAD_DIM
    row_mask = row_valid[:, None] & dim_valid[None, :]
    queries = tl.load(query + sequence.to(tl.int64) * stride_query_token + head[:, None] * stride_query_head
                      + dims[None, :], mask=row_mask, other=0.0)

    running_max = tl.full([ROWS], -1.0e30, dtype=tl.float32)
    running_sum = tl.zeros([ROWS], dtype=tl.float32)
    accumulator = tl.zeros([ROWS, DIM_PADDED], dtype=tl.float32)
    table = block_tables + sequence.to(tl.int64) * stride_table_seq
    query_position = tl.full([ROWS], 0, dtype=tl.int32) + seq_len - 1  # the one query sees every key
    for key_start in range(start, end, BLOCK_KEY):
        running_max, running_sum, accumulator = attend_tile(
            queries, running_max, running_sum, accumulator, key_cache, value_cache, table,
            key_start, end, query_position, kv_head, dims, dim_valid,
            stride_cache_block, stride_cache_slot, stride_cache_head, block_size, scale_log2, BLOCK_KEY)

    # Partials are laid out [sequence, head, partition]; an empty partition stores a zero sum.
    partial = (sequence.to(tl.int64) * num_heads + head) * num_partitions + partition
    tl.store(partial_max + partial, running_max, mask=row_valid)
    tl.store(partial_sum + partial, running_sum, mask=row_valid)
    tl.store(partial_output + partial[:, None] * HEAD_DIM + dims[None, :], accumulator, mask=row_mask)


@triton.jit
def _merge_kernel(
    output, partial_output, partial_max, partial_sum,
    stride_output_token, stride_output_head,
    num_partitions,
    HEAD_DIM: tl.constexpr,
    DIM_PADDED: tl.constexpr,
    PARTITIONS_PADDED: tl.constexpr,
):
    sequence = tl.program_id(0)
    head = tl.program_id(1)
    partitions = tl.arange(0, PARTITIONS_PADDED)
    valid = partitions < num_partitions
    base = (sequence.to(tl.int64) * tl.num_programs(1) + head) * num_partitions
    maxima = tl.load(partial_max + base + partitions, mask=valid, other=-1.0e30)
    sums = tl.load(partial_sum + base + partitions, mask=valid, other=0.0)
    dims = tl.arange(0, DIM_PADDED)
    dim_valid = dims < HEAD_DIM
    partials = tl.load(partial_output + (base + partitions)[:, None] * HEAD_DIM + dims[None, :],
                       mask=valid[:, None] & dim_valid[None, :], other=0.0)
    weights = tl.exp2(maxima - tl.max(maxima, axis=0))
    total = tl.sum(weights * sums, axis=0)
    result = tl.sum(weights[:, None] * partials, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(output + sequence.to(tl.int64) * stride_output_token + head * stride_output_head + dims,
             result.to(output.dtype.element_ty), mask=dim_valid)


def num_partitions(max_seq_len: int, partition_size: int = PARTITION_SIZE) -> int:
    return triton.cdiv(max(max_seq_len, 1), partition_size)


def decode_attention_triton(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    partition_size: int = PARTITION_SIZE,
) -> torch.Tensor:
    """`loraserve.kernels.attention.paged_attention` for a batch of decodes only (query [num_seqs, heads, head_dim]: one
    token per sequence, in sequence order). Partitions are sized for `metadata.max_seq_len`."""
    num_tokens, num_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, _ = key_cache.shape
    num_seqs = metadata.seq_lens.shape[0]
    assert metadata.max_query_len == 1 and num_tokens == num_seqs, "decode batches only: one token per sequence"
    assert query.stride(2) == 1 and key_cache.is_contiguous() and value_cache.is_contiguous()
    group = num_heads // num_kv_heads
    splits = num_partitions(metadata.max_seq_len, partition_size)
    partial_output = torch.empty(num_seqs, num_heads, splits, head_dim, dtype=torch.float32, device=query.device)
    partial_max = torch.empty(num_seqs, num_heads, splits, dtype=torch.float32, device=query.device)
    partial_sum = torch.empty_like(partial_max)
    block_tables = metadata.block_tables.contiguous()
    dim_padded = max(16, triton.next_power_of_2(head_dim))
    block_key = 64 if head_dim <= 64 else 32
    assert partition_size % block_key == 0
    _partition_kernel[(num_seqs, num_kv_heads, splits)](
        query, key_cache, value_cache, partial_output, partial_max, partial_sum,
        block_tables, metadata.seq_lens,
        query.stride(0), query.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        block_tables.stride(0),
        block_size,
        scale * 1.4426950408889634,
        GROUP=group, ROWS=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, DIM_PADDED=dim_padded,
        PARTITION=partition_size, BLOCK_KEY=block_key,
    )
    output = torch.empty_like(query)
    _merge_kernel[(num_seqs, num_heads)](
        output, partial_output, partial_max, partial_sum,
        output.stride(0), output.stride(1),
        splits,
        HEAD_DIM=head_dim, DIM_PADDED=dim_padded, PARTITIONS_PADDED=max(2, triton.next_power_of_2(splits)),
    )
    return output
