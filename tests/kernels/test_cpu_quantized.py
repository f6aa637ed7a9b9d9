"""The CPU's weight-only kernel, four and eight bits, against the dequantized weight times x in float64: exactly
where the activations are representable in int16, within int16 rounding (and the output dtype's) otherwise; and
the layer uses it once built."""
import pytest
import torch

from loraserve.kernels import cpu_quantized
from loraserve.kernels.cpu_quantized import GROUP_SIZE, pack
from loraserve.model.layers.quantized_linear import QuantizedLinear
from loraserve.model.quantization import QuantizedTensor
from tests.kernels.helpers import relative_error


def random_codes(rows: int, columns: int, seed: int, bits: int) -> QuantizedTensor:
    """Codes over their whole range; scales and minimums that are float16 values, as the kernel stores them."""
    generator = torch.Generator().manual_seed(seed)
    groups = columns // GROUP_SIZE
    scales = (torch.rand(rows, groups, generator=generator) * 0.1 + 0.01).half().float()
    if bits == 8:
        codes = torch.randint(-127, 128, (rows, columns), generator=generator, dtype=torch.int8)
        return QuantizedTensor(codes, scales, None, 8)
    codes = torch.randint(0, 16, (rows, columns), generator=generator, dtype=torch.uint8)
    minimums = (-torch.rand(rows, groups, generator=generator) * 0.5).half().float()
    return QuantizedTensor(codes, scales, minimums, 4)


def run(quantized: QuantizedTensor, x: torch.Tensor) -> torch.Tensor:
    codes, scales = pack(quantized.codes, quantized.scales, quantized.minimums, quantized.bits)
    return cpu_quantized.KERNEL.get().quantized_linear(x, codes, scales, quantized.shape[0], quantized.bits)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 3, 8, 13])
def test_activations_exact_in_int16_give_the_float64_product(rows: int, bits: int):
    """Each group's largest activation is 32767 steps of a power of two and the others whole steps: int16 holds
    them exactly, so only float32 summation separates the kernel from float64. Activation rows past a block of 8
    and weight rows past whole tiles of 16 (40) included."""
    quantized = random_codes(40, 96, seed=rows, bits=bits)
    generator = torch.Generator().manual_seed(rows)
    steps = torch.randint(-32767, 32768, (rows, 96), generator=generator).float()
    steps.view(rows, -1, GROUP_SIZE)[:, :, 5] = 32767.0
    x = steps * 2.0**-15
    expected = x.double() @ quantized.dequantize().double().T
    assert relative_error(run(quantized, x), expected) < 1e-6


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_any_activations_within_int16_rounding(dtype: torch.dtype, tolerance: float, bits: int):
    quantized = random_codes(576, 1536, seed=1, bits=bits)
    x = torch.randn(5, 1536, generator=torch.Generator().manual_seed(2)).to(dtype)
    output = run(quantized, x)
    assert output.dtype == dtype and output.shape == (5, 576)
    assert relative_error(output, x.double() @ quantized.dequantize().double().T) < tolerance


@pytest.mark.parametrize("bits", [4, 8])
def test_a_layer_runs_the_kernel(bits: int):
    quantized = random_codes(64, 128, seed=3, bits=bits)
    layer = QuantizedLinear(128, 64, bits)
    for name, part in quantized.parts().items():
        getattr(layer, name).copy_(part)
    layer.pack()
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(4))
    assert torch.equal(layer(x), run(quantized, x))


def test_scales_that_are_not_float16_values_are_refused():
    quantized = random_codes(16, 32, seed=5, bits=4)
    with pytest.raises(ValueError, match="float16"):
        pack(quantized.codes, quantized.scales + 1e-6, quantized.minimums, 4)
