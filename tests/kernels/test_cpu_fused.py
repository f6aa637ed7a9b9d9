"""The CPU's fused element-wise steps against their torch forms: RMSNorm, SiLU times up, and rotary embedding with
the keys and values stored in the paged cache (a padding token's slot left alone)."""
import pytest
import torch
import torch.nn.functional as F

from loraserve.kernels import fused
from loraserve.kernels.attention import write_kv_cache_reference
from loraserve.kernels.fused import apply_rotary, rms_norm_reference
from tests.kernels.helpers import relative_error

TOLERANCES = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def random(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_close(output: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert output.dtype == expected.dtype and output.shape == expected.shape
    assert relative_error(output, expected) < TOLERANCES[dtype]


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_rms_norm_equals_the_reference(dtype: torch.dtype):
    hidden, weight = random(7, 576, dtype=dtype) * 3, random(576, dtype=dtype, seed=1)
    assert_close(fused.KERNEL.get().rms_norm(hidden, weight, 1e-5), rms_norm_reference(hidden, weight, 1e-5), dtype)


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_silu_and_mul_equals_the_reference(dtype: torch.dtype):
    gate_up = random(5, 2 * 1536, dtype=dtype) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    assert_close(fused.KERNEL.get().silu_and_mul(gate_up), F.silu(gate) * up, dtype)


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_rotary_and_cache_write_equal_the_reference(dtype: torch.dtype):
    heads, kv_heads, head_dim, tokens = 9, 3, 64, 4
    qkv = random(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    angles = random(tokens, 1, head_dim // 2, seed=1) * 3
    cos, sin = angles.cos(), angles.sin()
    slots = torch.tensor([5, 17, -1, 2])  # the third token is padding
    caches = [torch.zeros(3, 8, kv_heads, head_dim, dtype=dtype) for _ in range(4)]
    query = fused.KERNEL.get().rotate_and_cache(qkv, cos.flatten(1), sin.flatten(1), caches[0], caches[1], slots,
                                                heads)
    expected_query, key, value = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    key = apply_rotary(key.reshape(tokens, kv_heads, head_dim), cos, sin)
    write_kv_cache_reference(key, value.reshape(tokens, kv_heads, head_dim), caches[2], caches[3], slots)
    assert_close(query, apply_rotary(expected_query.reshape(tokens, heads, head_dim), cos, sin), dtype)
    assert_close(caches[0], caches[2], dtype)
    assert torch.equal(caches[1], caches[3])  # values are copied as they are
    written = caches[0].flatten(0, 1).abs().sum((1, 2)).nonzero().flatten().tolist()
    assert written == [2, 5, 17]  # the padding token wrote nothing
