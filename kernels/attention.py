"""Attention over a paged KV cache: the one dispatch point the model calls.

A step packs every scheduled sequence's new tokens into one flat batch. Sequence `i` owns query rows
`query_start_loc[i]:query_start_loc[i + 1]`; they are the last tokens of its `seq_lens[i]`-token context, whose
keys and values live in the cache blocks listed in `block_tables[i]`. Prefill chunks and decodes are the same
case (a decode is a query of length one), so one signature serves both.
"""
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Where each sequence's tokens sit in the flat batch and in the paged cache."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32: cache blocks of each sequence, padded with 0
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: cumulative query lengths
    seq_lens: torch.Tensor  # [num_seqs] int32: context length of each sequence, new tokens included
    max_query_len: int
    max_seq_len: int


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store new keys/values [num_tokens, kv_heads, head_dim] into caches [num_blocks, block_size, kv_heads,
    head_dim] at their slots; a negative slot marks padding and is skipped."""
    if key.is_cuda:
        # Imported here so the CPU server never needs a working Triton.
        from kernels.triton_kv_write import write_kv_cache_triton
        write_kv_cache_triton(key, value, key_cache, value_cache, slot_mapping)
    else:
        write_kv_cache_reference(key, value, key_cache, value_cache, slot_mapping)


def write_kv_cache_reference(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Plain torch: one masked scatter into the caches viewed as flat slot rows."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    key_cache.view(-1, *key_cache.shape[2:])[slots] = key[valid]
    value_cache.view(-1, *value_cache.shape[2:])[slots] = value[valid]


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of query [num_tokens, heads, head_dim] over each sequence's cached context.

    The new tokens' keys/values must already be written to the cache. Returns [num_tokens, heads, head_dim].
    """
    if query.is_cuda:
        from kernels.triton_paged_attention import paged_attention_triton
        return paged_attention_triton(query, key_cache, value_cache, metadata, scale)
    return paged_attention_reference(query, key_cache, value_cache, metadata, scale)


def paged_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Plain torch: gather every sequence's context from its blocks, pad the batch, one masked SDPA call."""
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = metadata.seq_lens.shape[0]
    num_blocks, block_size, num_kv_heads = key_cache.shape[:3]
    max_query, max_context = metadata.max_query_len, metadata.max_seq_len
    blocks_needed = (max_context + block_size - 1) // block_size
    block_ids = metadata.block_tables[:, :blocks_needed].flatten()
    # index_select over whole blocks as rows is several times faster on CPU than advanced indexing.
    keys, values = (
        cache.view(num_blocks, -1).index_select(0, block_ids)
        .view(num_seqs, -1, num_kv_heads, head_dim)[:, :max_context]
        for cache in (key_cache, value_cache)
    )

    starts = metadata.query_start_loc[:-1].long()
    query_lens = metadata.query_start_loc[1:].long() - starts
    seq_lens = metadata.seq_lens.long()
    row = torch.arange(max_query, device=query.device)
    row_valid = row[None, :] < query_lens[:, None]  # [num_seqs, max_query]
    token_index = (starts[:, None] + row[None, :]).clamp(max=num_tokens - 1)
    padded_query = query[token_index]  # [num_seqs, max_query, heads, head_dim]

    # Query row r of sequence i sits at position seq_len - query_len + r and sees keys up to it.
    query_positions = seq_lens[:, None] - query_lens[:, None] + row[None, :]
    key_positions = torch.arange(max_context, device=query.device)
    mask = key_positions[None, None, :] <= query_positions[:, :, None]  # [num_seqs, max_query, max_context]

    output = torch.nn.functional.scaled_dot_product_attention(
        padded_query.transpose(1, 2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=mask[:, None],
        scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    ).transpose(1, 2)
    return output[row_valid]
