"""Attention over a paged KV cache: the one dispatch point the model calls.

A step packs every scheduled sequence's new tokens into one flat batch. Sequence `i` owns query rows
`query_start_loc[i]:query_start_loc[i + 1]`; they are the last tokens of its `seq_lens[i]`-token context, whose
keys and values live in the cache blocks listed in `block_tables[i]`. Prefill chunks and decodes are the same
case (a decode is a query of length one), so one signature serves both.
"""
from dataclasses import dataclass
from functools import cached_property

import torch

from loraserve.kernels import cpu_attention


@dataclass
class QueryPadding:
    """How the torch reference pads the flat batch into [num_seqs, max_query_len] rows, and the causal mask."""

    token_index: torch.Tensor  # [num_seqs * max_query_len]: flat token of each padded row (clamped for padding)
    row_valid: torch.Tensor  # [num_seqs * max_query_len] bool: the row is a real token
    mask: torch.Tensor  # [num_seqs, 1, max_query_len, max_seq_len] bool: the key is visible to the row


@dataclass
class AttentionMetadata:
    """Where each sequence's tokens sit in the flat batch and in the paged cache."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32: cache blocks of each sequence, padded with 0
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: cumulative query lengths
    seq_lens: torch.Tensor  # [num_seqs] int32: context length of each sequence, new tokens included
    max_query_len: int
    max_seq_len: int

    @cached_property
    def query_padding(self) -> QueryPadding:
        """Computed once per step, on first use, for every layer of the torch reference."""
        starts = self.query_start_loc[:-1].long()
        query_lens = self.query_start_loc[1:].long() - starts
        row = torch.arange(self.max_query_len, device=starts.device)
        token_index = (starts[:, None] + row[None, :]).clamp(max=int(self.query_start_loc[-1]) - 1)
        # Query row r of sequence i sits at position seq_len - query_len + r and sees keys up to it.
        query_positions = self.seq_lens.long()[:, None] - query_lens[:, None] + row[None, :]
        key_positions = torch.arange(self.max_seq_len, device=starts.device)
        mask = key_positions[None, None, :] <= query_positions[:, :, None]
        return QueryPadding(token_index.flatten(), (row[None, :] < query_lens[:, None]).flatten(), mask[:, None])


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
        from loraserve.kernels.triton_kv_write import write_kv_cache_triton
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
    """Plain torch: one row copy into the caches viewed as flat slot rows (padding dropped first, if any)."""
    if bool((slot_mapping < 0).any()):
        valid = slot_mapping >= 0
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    key_cache.view(-1, *key_cache.shape[2:]).index_copy_(0, slot_mapping, key)
    value_cache.view(-1, *value_cache.shape[2:]).index_copy_(0, slot_mapping, value)


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
        from loraserve.kernels.triton_paged_attention import paged_attention_triton
        return paged_attention_triton(query, key_cache, value_cache, metadata, scale)
    kernel = cpu_attention.KERNEL.get()
    if kernel is not None and metadata.max_query_len <= cpu_attention.SHORT_QUERY:
        return kernel.paged_attention(query.contiguous(), key_cache, value_cache, metadata.block_tables,
                                      metadata.seq_lens, metadata.query_start_loc, scale)
    return paged_attention_reference(query, key_cache, value_cache, metadata, scale)


def paged_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Plain torch: gather every sequence's context from its blocks, pad the batch, one masked SDPA call."""
    num_heads, head_dim = query.shape[1:]
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

    padding = metadata.query_padding
    padded_query = query.index_select(0, padding.token_index).view(num_seqs, max_query, num_heads, head_dim)
    output = torch.nn.functional.scaled_dot_product_attention(
        padded_query.transpose(1, 2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=padding.mask,
        scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    ).transpose(1, 2)
    return output.reshape(num_seqs * max_query, num_heads, head_dim)[padding.row_valid]
