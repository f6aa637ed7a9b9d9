"""The Triton paged attention against float64 attention computed sequence by sequence."""
import pytest
import torch

from loraserve.kernels.attention import paged_attention
from loraserve.kernels.triton_decode_attention import decode_attention_triton
from loraserve.kernels.triton_paged_attention import paged_attention_triton
from tests.kernels.helpers import attention_float64, make_batch, relative_error

# Decodes (query length 1) and prefill chunks mixed in one batch; odd lengths, not multiples of the block size.
QUERY_LENS = [1, 7, 1, 20]
SEQ_LENS = [9, 7, 70, 131]  # contexts longer than one key tile


def check_attention(query_lens: list[int], seq_lens: list[int], num_kv_heads: int, group: int, head_dim: int,
                    block_size: int, dtype: torch.dtype, device: str, tolerance: float) -> None:
    generator = torch.Generator().manual_seed(group * 100 + head_dim)
    query, key_cache, value_cache, metadata = make_batch(
        query_lens, seq_lens, num_kv_heads, group, head_dim, block_size, dtype, device, generator)
    scale = head_dim**-0.5
    output = paged_attention_triton(query, key_cache, value_cache, metadata, scale)
    assert output.shape == query.shape and output.dtype == query.dtype
    expected = attention_float64(query, key_cache, value_cache, metadata, scale)
    assert not output.isnan().any(), "an output element was left unwritten"
    assert relative_error(output.cpu(), expected) < tolerance


@pytest.mark.parametrize("num_kv_heads, group, head_dim, block_size", [
    (2, 1, 16, 4),
    (1, 3, 32, 8),
    (1, 8, 16, 16),
    (1, 3, 96, 8),  # a head size that is not a power of two: padded to 128 inside the kernel
])
def test_mixed_batch(num_kv_heads: int, group: int, head_dim: int, block_size: int) -> None:
    check_attention(QUERY_LENS, SEQ_LENS, num_kv_heads, group, head_dim, block_size, torch.float32, "cpu", 1e-5)


def test_decode_only() -> None:
    check_attention([1, 1, 1], [1, 77, 5], 1, 3, 128, 8, torch.float32, "cpu", 1e-5)


@pytest.mark.parametrize("num_kv_heads, group, head_dim, partition_size", [
    (2, 1, 16, 64),
    (1, 3, 32, 64),
    (1, 8, 128, 32),
    (2, 3, 96, 32),
])
def test_split_context_decode(num_kv_heads: int, group: int, head_dim: int, partition_size: int) -> None:
    """Contexts of one token, of less than one partition, and of several, some ending mid-partition."""
    seq_lens = [1, 77, 130, 5, 192]
    generator = torch.Generator().manual_seed(group)
    query, key_cache, value_cache, metadata = make_batch(
        [1] * len(seq_lens), seq_lens, num_kv_heads, group, head_dim, 8, torch.float32, "cpu", generator)
    output = decode_attention_triton(query, key_cache, value_cache, metadata, head_dim**-0.5, partition_size)
    expected = attention_float64(query, key_cache, value_cache, metadata, head_dim**-0.5)
    assert not output.isnan().any(), "an output element was left unwritten"
    assert relative_error(output, expected) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestOnGpu:
    @pytest.mark.parametrize("num_kv_heads, group, head_dim", [(8, 1, 128), (3, 3, 64), (4, 8, 128)])
    def test_mixed_batch_bfloat16(self, num_kv_heads: int, group: int, head_dim: int) -> None:
        query_lens = [1, 1, 300, 1, 77, 1]
        seq_lens = [513, 2048, 300, 17, 1000, 1]
        check_attention(query_lens, seq_lens, num_kv_heads, group, head_dim, 16, torch.bfloat16, "cuda", 1e-2)

    @pytest.mark.parametrize("num_kv_heads, group, head_dim", [(8, 1, 128), (3, 3, 64), (4, 8, 128)])
    def test_long_context_decode_bfloat16(self, num_kv_heads: int, group: int, head_dim: int) -> None:
        seq_lens = [4096, 1, 513, 2048, 3000, 17, 1024, 7]  # several partitions each, through the dispatcher
        check_attention([1] * len(seq_lens), seq_lens, num_kv_heads, group, head_dim, 16, torch.bfloat16, "cuda",
                        1e-2)

    def test_dispatch_point_on_cuda(self) -> None:
        query, key_cache, value_cache, metadata = make_batch(
            [1, 5], [9, 5], 1, 3, 64, 16, torch.bfloat16, "cuda", torch.Generator().manual_seed(0))
        output = paged_attention(query, key_cache, value_cache, metadata, 0.125)
        expected = attention_float64(query, key_cache, value_cache, metadata, 0.125)
        assert relative_error(output.cpu(), expected) < 1e-2
