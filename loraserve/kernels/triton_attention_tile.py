"""The step both Triton attention kernels repeat over a sequence's context: one tile of keys and values read from
the paged cache through the block table, folded into an online softmax."""
import triton
import triton.language as tl


@triton.jit
def attend_tile(
    queries, running_max, running_sum, accumulator,  # [rows, dim], [rows], [rows], [rows, dim] (float32)
    key_cache, value_cache, table,  # `table`: this sequence's row of the block tables
    key_start, key_end, query_position,  # keys key_start .. key_end - 1; each row sees keys up to its position
    kv_head, dims, dim_valid,
    stride_cache_block, stride_cache_slot, stride_cache_head,
    block_size, scale_log2,
    BLOCK_KEY: tl.constexpr,
):
    """Return the running max, sum and weighted values once the tile's visible keys are added. Scores are in
    log2 units (`scale_log2` includes log2(e)), so the softmax uses exp2."""
    key_position = key_start + tl.arange(0, BLOCK_KEY)
    key_valid = key_position < key_end
    physical_block = tl.load(table + key_position // block_size, mask=key_valid, other=0).to(tl.int64)
    cache_offsets = (physical_block[:, None] * stride_cache_block
                     + (key_position % block_size)[:, None] * stride_cache_slot
                     + kv_head * stride_cache_head + dims[None, :])
    cache_mask = key_valid[:, None] & dim_valid[None, :]
    keys = tl.load(key_cache + cache_offsets, mask=cache_mask, other=0.0)
    values = tl.load(value_cache + cache_offsets, mask=cache_mask, other=0.0)

    # "ieee": float32 operands multiply in float32, not TF32 (bfloat16 ones are unaffected).
    scores = tl.dot(queries, tl.trans(keys), input_precision="ieee").to(tl.float32) * scale_log2
    visible = key_valid[None, :] & (key_position[None, :] <= query_position[:, None])
    scores = tl.where(visible, scores, float("-inf"))

    new_max = tl.maximum(running_max, tl.max(scores, axis=1))
    correction = tl.exp2(running_max - new_max)
    probabilities = tl.exp2(scores - new_max[:, None])
    running_sum = running_sum * correction + tl.sum(probabilities, axis=1)
    weighted = tl.dot(probabilities.to(values.dtype), values, input_precision="ieee")
    return new_max, running_sum, accumulator * correction[:, None] + weighted
