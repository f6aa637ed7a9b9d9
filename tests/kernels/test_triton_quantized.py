"""The GPU's weight-only kernel against the dequantized weight times x in float64 (through Triton's interpreter on a
CPU; in bfloat16 on a GPU)."""
import pytest
import torch

from loraserve.kernels.triton_quantized import pack, quantized_linear
from loraserve.model.quantization import quantize
from tests.kernels.helpers import relative_error


def check(bits: int, rows: int, out_features: int, in_features: int, dtype: torch.dtype, device: str) -> float:
    generator = torch.Generator().manual_seed(rows * 10 + bits)
    quantized = quantize(torch.randn(out_features, in_features, generator=generator) * 0.1, bits)
    x = torch.randn(rows, in_features, generator=generator)
    parts = [part.to(device) for part in pack(quantized.codes, quantized.scales, quantized.minimums, bits)]
    output = quantized_linear(x.to(device, dtype), tuple(parts), out_features, bits)
    assert output.dtype == dtype and output.shape == (rows, out_features)
    return relative_error(output.cpu(), x.double() @ quantized.dequantize().double().T)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows, out_features", [(1, 48), (19, 80)])  # a partial row tile, a partial output tile
def test_equals_float64_in_float32(bits: int, rows: int, out_features: int) -> None:
    assert check(bits, rows, out_features, 64, torch.float32, "cpu") < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 16, 300])
def test_equals_float64_in_bfloat16_on_the_gpu(bits: int, rows: int) -> None:
    assert check(bits, rows, 1536, 576, torch.bfloat16, "cuda") < 1e-2
