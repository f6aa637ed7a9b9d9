"""The CPU's 4-bit kernel against the dequantized weight times x in float64: exactly where the activations are
representable in int16, within int16 rounding (and the output dtype's) otherwise; and the layer uses it once
built."""
import pytest
import torch

from loraserve.kernels import cpu_int4
from loraserve.kernels.cpu_int4 import GROUP_SIZE, pack_int4
from loraserve.model.layers.quantized_linear import QuantizedLinear
from loraserve.model.quantization import QuantizedTensor
from tests.kernels.helpers import relative_error


def random_codes(rows: int, columns: int, seed: int) -> QuantizedTensor:
    generator = torch.Generator().manual_seed(seed)
    groups = columns // GROUP_SIZE
    codes = torch.randint(0, 16, (rows, columns), generator=generator, dtype=torch.uint8)
    scales = torch.rand(rows, groups, generator=generator) * 0.1 + 0.01
    minimums = -torch.rand(rows, groups, generator=generator) * 0.5
    return QuantizedTensor(codes, scales, minimums, 4)


def run(quantized: QuantizedTensor, x: torch.Tensor) -> torch.Tensor:
    nibbles, scale_and_minimum = pack_int4(quantized.codes, quantized.scales, quantized.minimums)
    return cpu_int4.KERNEL.get().int4_linear(x, nibbles, scale_and_minimum)


@pytest.mark.parametrize("rows", [1, 3, 8, 13])
def test_activations_exact_in_int16_give_the_float64_product(rows: int):
    """Each group's largest activation is 32767 steps of a power of two and the others whole steps: int16 holds
    them exactly, so only float32 summation separates the kernel from float64. Rows past a tile of 8 included."""
    quantized = random_codes(40, 96, seed=rows)
    generator = torch.Generator().manual_seed(rows)
    steps = torch.randint(-32767, 32768, (rows, 96), generator=generator).float()
    steps.view(rows, -1, GROUP_SIZE)[:, :, 5] = 32767.0
    x = steps * 2.0**-15
    expected = x.double() @ quantized.dequantize().double().T
    assert relative_error(run(quantized, x), expected) < 1e-6


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_any_activations_within_int16_rounding(dtype: torch.dtype, tolerance: float):
    quantized = random_codes(576, 1536, seed=1)
    x = torch.randn(5, 1536, generator=torch.Generator().manual_seed(2)).to(dtype)
    output = run(quantized, x)
    assert output.dtype == dtype and output.shape == (5, 576)
    assert relative_error(output, x.double() @ quantized.dequantize().double().T) < tolerance


def test_a_four_bit_layer_runs_the_kernel_and_agrees_with_pytorchs(monkeypatch: pytest.MonkeyPatch):
    quantized = random_codes(64, 128, seed=3)
    layer = QuantizedLinear(128, 64, 4)
    for name, part in quantized.parts().items():
        getattr(layer, name).copy_(part)
    layer.pack()
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(4))
    ours = layer(x)
    monkeypatch.setattr(cpu_int4.KERNEL, "module", None)  # not built yet: PyTorch's kernel
    theirs = layer(x)
    expected = x.double() @ quantized.dequantize().double().T
    assert relative_error(ours, expected) < 1e-2 and relative_error(theirs, expected) < 1e-2
    assert not torch.equal(ours, theirs)  # two kernels really ran
