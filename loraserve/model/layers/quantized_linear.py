"""A linear layer whose weight is held quantized and multiplied by weight-only kernels.

Four-bit weights run on our C++ kernel (`kernels/cpu_int4.cpp`: int16 activations, integer dot products per
group, as llama.cpp runs Q4_1) once built, and on PyTorch's `_weight_int4pack_mm_for_cpu` until then (or without a
compiler), so a layer keeps both layouts of its codes. Eight-bit weights run on PyTorch's `_weight_int8pack_mm`.
PyTorch's kernels ship with it, read the packed weight in place and take group-wise scales and zero points, so
GGUF's Q4 blocks map onto every one of these with no requantization. They win where a step is bound by reading
weights (a few tokens: decodes at small batch); with many tokens a float matrix product is faster, so a layer may
also keep the dequantized weight and choose per call (`INT_KERNEL_MAX_TOKENS`, measured on a 2-core AMD EPYC: see
benchmarks/RESULTS.md).
"""
import torch
import torch.nn.functional as F
from torch import nn

from loraserve.kernels import cpu_int4
from loraserve.model.quantization import INT4_GROUP_SIZE, QuantizedTensor, quantize

INT4_CODE_OFFSET = 8  # the int4 kernel computes (code - 8) * scale + zero
# The kernels' vectorized path takes bfloat16 activations (float32 ones run scalar code, ten times slower, even
# on CPUs without native bfloat16), so each projection's input and output are converted.
KERNEL_DTYPE = torch.bfloat16
INT_KERNEL_MAX_TOKENS = 16  # above this many tokens a layer that kept its dense weight uses it


class QuantizedLinear(nn.Module):
    """y = x W^T, W given as codes and scales (a `QuantizedTensor`'s parts, loaded into the buffers by name),
    then packed once into the kernel's layout by `pack`."""

    def __init__(self, in_features: int, out_features: int, bits: int) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"weight-only quantization supports 4 or 8 bits, not {bits}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        groups = in_features // INT4_GROUP_SIZE if bits == 4 else 1
        code_dtype = torch.uint8 if bits == 4 else torch.int8
        self.register_buffer("codes", torch.empty(out_features, in_features, dtype=code_dtype))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float32))
        if bits == 4:
            self.register_buffer("minimums", torch.empty(out_features, groups, dtype=torch.float32))
        self.packed: torch.Tensor | None = None
        self.scale_and_zero: torch.Tensor | None = None
        self.nibbles: torch.Tensor | None = None  # the C++ kernel's layout of four-bit codes, and its scales
        self.scale_and_minimum: torch.Tensor | None = None
        self.dense: torch.Tensor | None = None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bits: int) -> "QuantizedLinear":
        """A packed layer holding `weight` quantized now, and `weight` itself (shared, not copied) as the dense
        weight for calls with many tokens."""
        layer = cls(weight.shape[1], weight.shape[0], bits)
        for name, part in quantize(weight, bits).parts().items():
            getattr(layer, name).copy_(part)
        layer.pack()
        layer.dense = weight
        return layer

    def pack(self, dense_dtype: torch.dtype | None = None) -> None:
        """Convert the loaded codes into the kernel's layout and let the loading buffers go; with `dense_dtype`,
        also keep the weight the codes stand for, in that dtype, for calls with many tokens."""
        quantized = QuantizedTensor(self.codes, self.scales, getattr(self, "minimums", None), self.bits)
        if dense_dtype is not None:
            self.dense = quantized.dequantize().to(dense_dtype)
        if self.bits == 4:
            self.nibbles, self.scale_and_minimum = cpu_int4.pack_int4(self.codes, self.scales, self.minimums)
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes.int(), 1)
            zeros = self.minimums + INT4_CODE_OFFSET * self.scales
            self.scale_and_zero = torch.stack([self.scales, zeros], -1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)
            del self.minimums
        else:
            self.packed = self.codes
            self.scale_and_zero = self.scales[:, 0].to(KERNEL_DTYPE)
        del self.codes, self.scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.dense is not None and flat.shape[0] > INT_KERNEL_MAX_TOKENS:
            return F.linear(x, self.dense)
        kernel = cpu_int4.KERNEL.get() if self.bits == 4 else None
        if kernel is not None:
            output = kernel.int4_linear(flat.contiguous(), self.nibbles, self.scale_and_minimum)
            return output.reshape(*x.shape[:-1], self.out_features)
        flat = flat.to(KERNEL_DTYPE)
        if self.bits == 4:
            output = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, INT4_GROUP_SIZE,
                                                                self.scale_and_zero)
        else:
            output = torch.ops.aten._weight_int8pack_mm(flat, self.packed, self.scale_and_zero)
        return output.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def linear_layer(in_features: int, out_features: int, bits: int | None) -> nn.Module:
    """The model's projections: a plain float linear layer, or a quantized one when `bits` is given."""
    if bits is None:
        return nn.Linear(in_features, out_features, bias=False)
    return QuantizedLinear(in_features, out_features, bits)
