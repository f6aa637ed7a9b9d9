"""Triton KV-cache write: scatter each new token's key/value rows into its paged-cache slot.

One program copies one token's rows for all KV heads; a negative slot (padding) stores nothing. The torch
reference is `loraserve.kernels.attention.write_kv_cache_reference`.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    key, value, key_cache, value_cache, slot_mapping,
    stride_key_token, stride_key_head,
    stride_value_token, stride_value_head,
    stride_cache_block, stride_cache_slot, stride_cache_head,
    block_size,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PADDED: tl.constexpr,
    DIM_PADDED: tl.constexpr,
):
    token = tl.program_id(0)
    heads = tl.arange(0, HEADS_PADDED)
    dims = tl.arange(0, DIM_PADDED)
    # The slot is loaded once per head row (a scalar bool in a mask trips Triton's interpreter); a negative slot
    # folds into the mask, so padding tokens load and store nothing.
    slot = tl.load(slot_mapping + token + heads * 0).to(tl.int64)[:, None]
    mask = (slot >= 0) & (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)
    block = slot // block_size
    offset = slot % block_size
    cache_offsets = (block * stride_cache_block + offset * stride_cache_slot
                     + heads[:, None] * stride_cache_head + dims[None, :])
    token = token.to(tl.int64)
    key_rows = tl.load(key + token * stride_key_token + heads[:, None] * stride_key_head + dims[None, :], mask=mask)
    value_rows = tl.load(value + token * stride_value_token + heads[:, None] * stride_value_head + dims[None, :],
                         mask=mask)
    tl.store(key_cache + cache_offsets, key_rows.to(key_cache.dtype.element_ty), mask=mask)
    tl.store(value_cache + cache_offsets, value_rows.to(value_cache.dtype.element_ty), mask=mask)


def write_kv_cache_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Same contract as `loraserve.kernels.attention.write_kv_cache`: keys/values [num_tokens, kv_heads, head_dim] into
    caches [num_blocks, block_size, kv_heads, head_dim]; negative slots are skipped."""
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape and key_cache.shape == value_cache.shape
    assert key_cache.shape[2:] == (num_kv_heads, head_dim) and slot_mapping.shape == (num_tokens,)
    assert key.stride(2) == 1 and value.stride(2) == 1 and key_cache.is_contiguous() and value_cache.is_contiguous()
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1),
        value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        key_cache.shape[1],
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HEADS_PADDED=triton.next_power_of_2(num_kv_heads),
        DIM_PADDED=triton.next_power_of_2(head_dim),
    )
