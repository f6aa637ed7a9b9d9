"""The Triton KV-cache write against a direct slot-by-slot copy."""
import pytest
import torch

from loraserve.kernels.triton_kv_write import write_kv_cache_triton


def check_write(num_tokens: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                device: str) -> None:
    generator = torch.Generator().manual_seed(num_tokens * 31 + head_dim)
    num_blocks = (num_tokens + block_size - 1) // block_size + 2
    # Keys and values as the model passes them: strided views into one fused projection output.
    fused = torch.randn(num_tokens, 2 * num_kv_heads * head_dim, generator=generator).to(dtype=dtype, device=device)
    key, value = (part.view(num_tokens, num_kv_heads, head_dim) for part in fused.chunk(2, dim=1))
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:num_tokens]
    slots[::4] = -1  # padding tokens
    slot_mapping = slots.to(device)
    key_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype,
                           device=device)
    value_cache = key_cache.clone()
    write_kv_cache_triton(key, value, key_cache, value_cache, slot_mapping)

    expected_key = torch.full(key_cache.shape, float("nan"), dtype=dtype)
    expected_value = expected_key.clone()
    for token, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected_key[slot // block_size, slot % block_size] = key[token].cpu()
            expected_value[slot // block_size, slot % block_size] = value[token].cpu()
    # Exact copy; NaN marks slots that must stay untouched.
    torch.testing.assert_close(key_cache.cpu(), expected_key, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(value_cache.cpu(), expected_value, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("num_tokens, num_kv_heads, head_dim, block_size", [
    (13, 3, 64, 4),
    (7, 1, 32, 16),
    (5, 2, 24, 8),  # head_dim not a power of two
])
def test_write_matches_slots(num_tokens: int, num_kv_heads: int, head_dim: int, block_size: int) -> None:
    check_write(num_tokens, num_kv_heads, head_dim, block_size, torch.float32, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestOnGpu:
    @pytest.mark.parametrize("num_kv_heads, head_dim", [(3, 64), (8, 128)])
    def test_write_bfloat16(self, num_kv_heads: int, head_dim: int) -> None:
        check_write(1000, num_kv_heads, head_dim, 16, torch.bfloat16, "cuda")
