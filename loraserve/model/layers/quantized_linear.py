"""A linear layer whose weight is held quantized and multiplied by weight-only kernels.

Both widths run on our C++ kernel (`kernels/cpu_quantized.cpp`: int16 activations, integer dot products per group
of 32, output rows in the vector lanes) once it is built: on a 2-core AMD EPYC it beats a float32 matrix product
of the weight the codes stand for at every step size up to the 512-token budget (3.0 against 44.7 ms for a decode
step's projections at one token, 63 against 152 at 64, 390 against 693 at 512), so no float copy is kept. Until it
is built (or without a compiler) four-bit layers run on PyTorch's `_weight_int4pack_mm_for_cpu`, which takes the
same group-wise scales and minimums with no requantization, so a four-bit layer keeps both layouts; eight-bit ones
(whose group scales PyTorch's int8 kernel cannot take), and four-bit ones of a shape PyTorch's layout refuses,
multiply by their dequantized weight. On CUDA the codes run on a Triton kernel (`kernels/triton_quantized.py`), so
a GPU serves a quantized base, with LoRA adapters on top, in a quarter or half of the weight memory.
"""
import torch
import torch.nn.functional as F
from torch import nn

from loraserve.kernels import cpu_quantized
from loraserve.model.quantization import GROUP_SIZE, QuantizedTensor, quantize

INT4_CODE_OFFSET = 8  # the int4 kernel computes (code - 8) * scale + zero
# PyTorch's int4 kernel vectorizes bfloat16 activations only (float32 ones run scalar code, ten times slower, even
# on CPUs without native bfloat16), so its input and output are converted.
KERNEL_DTYPE = torch.bfloat16


class QuantizedLinear(nn.Module):
    """y = x W^T, W given as codes and scales (a `QuantizedTensor`'s parts, loaded into the buffers by name),
    then packed once into the kernel's layout by `pack`."""

    def __init__(self, in_features: int, out_features: int, bits: int) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"weight-only quantization supports 4 or 8 bits, not {bits}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        groups = in_features // GROUP_SIZE
        code_dtype = torch.uint8 if bits == 4 else torch.int8
        self.register_buffer("codes", torch.empty(out_features, in_features, dtype=code_dtype))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float32))
        if bits == 4:
            self.register_buffer("minimums", torch.empty(out_features, groups, dtype=torch.float32))
        self.kernel_codes: torch.Tensor | None = None  # the C++ kernel's layout (`cpu_quantized.pack`)
        self.kernel_scales: torch.Tensor | None = None
        self.packed: torch.Tensor | None = None  # PyTorch's four-bit layout, until the C++ kernel is built
        self.scale_and_zero: torch.Tensor | None = None
        self.gpu_parts: tuple[torch.Tensor, ...] = ()  # the GPU kernel's layout (`triton_quantized.pack`)
        self.float_weight: torch.Tensor | None = None  # a float weight at hand for free (a tied head's), used
        # only until the kernel is built

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bits: int) -> "QuantizedLinear":
        """A packed layer holding `weight` quantized now; `weight` itself (shared, not copied) stands in for the
        codes until the kernel is built."""
        with torch.device(weight.device):  # packed for the kernel of the weight's device
            layer = cls(weight.shape[1], weight.shape[0], bits)
        for name, part in quantize(weight, bits).parts().items():
            getattr(layer, name).copy_(part)
        layer.pack()
        layer.float_weight = weight
        return layer

    def pack(self) -> None:
        """Convert the loaded codes into the kernels' layouts and let the loading buffers go."""
        minimums = getattr(self, "minimums", None)
        if self.codes.is_cuda:
            from loraserve.kernels import triton_quantized  # imported here: a CPU server never needs Triton
            self.gpu_parts = triton_quantized.pack(self.codes, self.scales, minimums, self.bits)
        else:
            self._pack_for_cpu(minimums)
        del self.codes, self.scales
        if minimums is not None:
            del self.minimums

    def _pack_for_cpu(self, minimums: torch.Tensor | None) -> None:
        self.kernel_codes, self.kernel_scales = cpu_quantized.pack(self.codes, self.scales, minimums, self.bits)
        if self.bits == 4 and self.out_features % 16 == 0:  # what PyTorch's int4 layout takes
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes.int(), 1)
            zeros = minimums + INT4_CODE_OFFSET * self.scales
            self.scale_and_zero = torch.stack([self.scales, zeros], -1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.is_cuda:
            from loraserve.kernels import triton_quantized
            output = triton_quantized.quantized_linear(flat.contiguous(), self.gpu_parts, self.out_features, self.bits)
        elif (kernel := cpu_quantized.KERNEL.get()) is not None:
            output = kernel.quantized_linear(flat.contiguous(), self.kernel_codes, self.kernel_scales,
                                             self.out_features, self.bits)
        elif self.packed is not None:
            output = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(KERNEL_DTYPE), self.packed, GROUP_SIZE,
                                                                self.scale_and_zero).to(x.dtype)
        else:
            weight = self.float_weight if self.float_weight is not None else self.dequantized()
            output = F.linear(flat, weight.to(x.dtype))
        return output.reshape(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight, from the kernel's layout."""
        parts = cpu_quantized.unpack(self.kernel_codes, self.kernel_scales, self.bits, self.out_features)
        return QuantizedTensor(parts[0], parts[1], parts[2] if self.bits == 4 else None, self.bits).dequantize()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def linear_layer(in_features: int, out_features: int, bits: int | None) -> nn.Module:
    """The model's projections: a plain float linear layer, or a quantized one when `bits` is given."""
    if bits is None:
        return nn.Linear(in_features, out_features, bias=False)
    return QuantizedLinear(in_features, out_features, bits)
