"""Triton paged attention for the engine's flat batch of prefill chunks and decodes.

A program owns one (sequence, query tile, KV head). Its rows are every query head of that KV group for a few
consecutive query tokens, so each key/value tile read through the block table serves the whole group (GQA).
The context is walked in tiles with an online softmax, so memory stays flat in the context length. The torch
reference is `loraserve.kernels.attention.paged_attention_reference`.
"""
import torch
import triton
import triton.language as tl

from loraserve.kernels.attention import AttentionMetadata
from loraserve.kernels.triton_attention_tile import attend_tile
from loraserve.kernels.triton_decode_attention import decode_attention_triton, num_partitions


@triton.jit
def _paged_attention_kernel(
    query, key_cache, value_cache, output,
    block_tables, query_start_loc, seq_lens,
    stride_query_token, stride_query_head,
    stride_output_token, stride_output_head,
    stride_cache_block, stride_cache_slot, stride_cache_head,
    stride_table_seq,
    block_size,
    scale_log2,  # softmax scale times log2(e): the loop uses exp2
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PADDED: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PADDED: tl.constexpr,
    BLOCK_QUERY: tl.constexpr,  # query tokens per program; BLOCK_QUERY * GROUP_PADDED rows
    BLOCK_KEY: tl.constexpr,  # context positions per loop step
):
    sequence = tl.program_id(0)
    query_tile = tl.program_id(1)
    kv_head = tl.program_id(2)

    query_start = tl.load(query_start_loc + sequence)
    query_len = tl.load(query_start_loc + sequence + 1) - query_start
    seq_len = tl.load(seq_lens + sequence)
    context_before = seq_len - query_len  # position of the sequence's first query token

    # Row r is query token r // GROUP_PADDED of this tile, query head r % GROUP_PADDED of this KV group.
    rows = tl.arange(0, BLOCK_QUERY * GROUP_PADDED)
    token_in_sequence = query_tile * BLOCK_QUERY + rows // GROUP_PADDED
    head = kv_head * GROUP + rows % GROUP_PADDED
    row_valid = (token_in_sequence < query_len) & (rows % GROUP_PADDED < GROUP)
    query_position = context_before + token_in_sequence
    dims = tl.arange(0, DIM_PADDED)
    dim_valid = dims < HEAD_DIM

    token = (query_start + token_in_sequence).to(tl.int64)
    query_pointers = query + token[:, None] * stride_query_token + head[:, None] * stride_query_head + dims[None, :]
    row_mask = row_valid[:, None] & dim_valid[None, :]
    queries = tl.load(query_pointers, mask=row_mask, other=0.0)

    # Finite start so rows that see no key in a tile give exp2(-inf) = 0, never inf - inf.
    running_max = tl.full([BLOCK_QUERY * GROUP_PADDED], -1.0e30, dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_QUERY * GROUP_PADDED], dtype=tl.float32)
    accumulator = tl.zeros([BLOCK_QUERY * GROUP_PADDED, DIM_PADDED], dtype=tl.float32)

    # Causal: the tile's last token sees up to its own position; an empty tile walks nothing.
    last_token = tl.minimum(query_len, (query_tile + 1) * BLOCK_QUERY)
    context_end = tl.where(query_tile * BLOCK_QUERY < query_len, context_before + last_token, 0)
    table = block_tables + sequence.to(tl.int64) * stride_table_seq
    for key_start in range(0, context_end, BLOCK_KEY):
        running_max, running_sum, accumulator = attend_tile(
            queries, running_max, running_sum, accumulator, key_cache, value_cache, table,
            key_start, context_end, query_position, kv_head, dims, dim_valid,
            stride_cache_block, stride_cache_slot, stride_cache_head, block_size, scale_log2, BLOCK_KEY)

    # Padding rows saw no key; keep them finite (they are never stored).
    result = accumulator / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
    output_pointers = output + token[:, None] * stride_output_token + head[:, None] * stride_output_head + dims[None, :]
    tl.store(output_pointers, result.to(output.dtype.element_ty), mask=row_mask)


def paged_attention_triton(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Same contract as `loraserve.kernels.attention.paged_attention`: causal attention of query [num_tokens, heads,
    head_dim] over each sequence's cached context; returns [num_tokens, heads, head_dim]. Decode-only batches
    with contexts longer than one partition go to the split-context decode kernel."""
    if metadata.max_query_len == 1 and num_partitions(metadata.max_seq_len) > 1:
        return decode_attention_triton(query, key_cache, value_cache, metadata, scale)
    num_tokens, num_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, cache_head_dim = key_cache.shape
    assert cache_head_dim == head_dim and value_cache.shape == key_cache.shape
    assert num_heads % num_kv_heads == 0, "query heads must split evenly over key/value heads"
    assert query.stride(2) == 1 and key_cache.is_contiguous() and value_cache.is_contiguous()
    output = torch.empty_like(query)
    num_seqs = metadata.seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return output

    group = num_heads // num_kv_heads
    group_padded = triton.next_power_of_2(group)
    # tl.dot wants at least 16 rows; decode-only batches need no more than that.
    rows = 16 if metadata.max_query_len == 1 else 64
    block_query = max(1, rows // group_padded)
    block_tables = metadata.block_tables.contiguous()
    grid = (num_seqs, triton.cdiv(metadata.max_query_len, block_query), num_kv_heads)
    _paged_attention_kernel[grid](
        query, key_cache, value_cache, output,
        block_tables, metadata.query_start_loc, metadata.seq_lens,
        query.stride(0), query.stride(1),
        output.stride(0), output.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        block_tables.stride(0),
        block_size,
        scale * 1.4426950408889634,
        GROUP=group,
        GROUP_PADDED=group_padded,
        HEAD_DIM=head_dim,
        DIM_PADDED=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_QUERY=block_query,
        BLOCK_KEY=64 if head_dim <= 64 else 32,
    )
    return output
