"""The CPU's adapter copies against torch: the finite check finds exactly the tensors `torch.isfinite` faults,
wherever the bad value sits, and the page write converts every float16 value as torch does. (Whole adapters
written through both paths are compared in tests/adapters/test_slot_pool.py.)"""
import math

import pytest
import torch

from loraserve.kernels import cpu_adapter_copy

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def kernel():
    return cpu_adapter_copy.KERNEL.get()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_the_finite_check_names_the_first_tensor_with_a_bad_value_wherever_it_sits(dtype: torch.dtype,
                                                                                   bad: float) -> None:
    info = torch.finfo(dtype)
    edges = torch.tensor([info.max, -info.max, info.tiny, info.smallest_normal / 4, 0.0, -0.0], dtype=dtype)
    tensors = [torch.randn(length, dtype=torch.float32).to(dtype) for length in (1, 17, 64, 1000, 4099)]
    tensors.append(edges)
    assert kernel().first_non_finite(tensors) == -1
    for index in (5, 3, 1):
        for position in (0, tensors[index].numel() // 2, tensors[index].numel() - 1):
            spoiled = [tensor.clone() for tensor in tensors]
            spoiled[index][position] = bad
            spoiled[-1] = spoiled[-1].clone().fill_(bad)  # a later bad tensor is not the first
            expected = next(i for i, tensor in enumerate(spoiled) if not torch.isfinite(tensor).all())
            assert expected == index and kernel().first_non_finite(spoiled) == index


@pytest.mark.parametrize("pool_dtype", DTYPES)
def test_every_finite_float16_value_is_written_as_torch_converts_it(pool_dtype: torch.dtype) -> None:
    """All 63,490 finite float16 values (subnormals, zeros of both signs, the largest), as A rows and as B
    columns scaled by 1: the kernel's vectorized conversions against torch's."""
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    values = values[torch.isfinite(values)]
    rank, in_features = 2, values.numel() // 2 + 1
    values = torch.cat([values, torch.zeros(rank * in_features - values.numel(), dtype=torch.float16)])
    lora_a = values.view(rank, in_features)
    lora_b = values.view(in_features, rank)
    pool_a = torch.zeros(1, 3, 1, in_features, dtype=pool_dtype)  # [layers, pages, slices, in]
    pool_b = torch.zeros(1, 3, in_features, dtype=pool_dtype)
    kernel().write_pages(pool_a, pool_b, [2, 1], [0, in_features], [0], [0], [lora_a], [lora_b], [1.0])
    assert torch.equal(pool_a[0, [2, 1], 0], lora_a.to(pool_dtype))
    assert torch.equal(pool_b[0, [2, 1]], lora_b.T.float().to(pool_dtype))
    assert not pool_a[:, 0].any() and not pool_b[:, 0].any()
