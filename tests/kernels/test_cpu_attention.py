"""The CPU's paged attention for short queries against float64 attention computed sequence by sequence, and the
dispatch: short queries go to the kernel, prefill chunks to the torch path."""
import pytest
import torch

from loraserve.kernels import attention, cpu_attention
from tests.kernels.helpers import attention_float64, make_batch, relative_error


def run_kernel(query_lens: list[int], seq_lens: list[int], num_kv_heads: int, group: int, head_dim: int,
               block_size: int, dtype: torch.dtype) -> float:
    generator = torch.Generator().manual_seed(group * 100 + head_dim)
    query, key_cache, value_cache, metadata = make_batch(
        query_lens, seq_lens, num_kv_heads, group, head_dim, block_size, dtype, "cpu", generator)
    scale = head_dim**-0.5
    output = cpu_attention.KERNEL.get().paged_attention(query, key_cache, value_cache, metadata.block_tables,
                                                        metadata.seq_lens, metadata.query_start_loc, scale)
    assert output.shape == query.shape and output.dtype == query.dtype and not output.isnan().any()
    return relative_error(output, attention_float64(query, key_cache, value_cache, metadata, scale))


@pytest.mark.parametrize("num_kv_heads, group, head_dim, block_size", [
    (2, 1, 16, 4),
    (3, 3, 64, 16),  # the embedded model's heads
    (2, 4, 128, 16),
    (1, 8, 96, 8),
    (1, 3, 64, 32),  # blocks of two 16-key runs, and a run cut short
])
def test_decodes_and_drafts_equal_float64(num_kv_heads: int, group: int, head_dim: int, block_size: int) -> None:
    """Decodes of one-token to multi-block contexts, and sequences verifying drafts (queries of 3 and 5 rows,
    each row seeing keys up to its own position), sequences 0 and 1 sharing their first block."""
    error = run_kernel([1, 1, 3, 1, 5], [1, 9, 40, 131, 17], num_kv_heads, group, head_dim, block_size,
                       torch.float32)
    assert error < 1e-5


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_half_precision_caches_equal_float64_within_their_rounding(dtype: torch.dtype, tolerance: float) -> None:
    assert run_kernel([1, 2, 1], [33, 70, 5], 3, 3, 64, 16, dtype) < tolerance


def test_short_queries_go_to_the_kernel_and_prefill_chunks_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    sent_to_torch = []
    monkeypatch.setattr(attention, "paged_attention_reference",
                        lambda query, *rest: sent_to_torch.append(len(query)) or query)
    generator = torch.Generator().manual_seed(0)
    for query_lens in ([1, cpu_attention.SHORT_QUERY], [1, cpu_attention.SHORT_QUERY + 1]):
        query, key_cache, value_cache, metadata = make_batch(query_lens, [40, 40], 1, 3, 16, 8, torch.float32, "cpu",
                                                             generator)
        output = attention.paged_attention(query, key_cache, value_cache, metadata, 0.25)
        if not sent_to_torch:
            assert relative_error(output, attention_float64(query, key_cache, value_cache, metadata, 0.25)) < 1e-5
    assert sent_to_torch == [2 + cpu_attention.SHORT_QUERY]  # only the batch with a prefill chunk
