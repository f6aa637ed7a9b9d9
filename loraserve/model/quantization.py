"""Weight-only quantized weights: what a loader hands over (`QuantizedTensor`), how a float weight is quantized on
load, and how GGUF's Q4_0, Q4_1 and Q8_0 blocks are decoded into the same form without a float copy.

Weights are group-wise along the input dimension, one float16 scale per group of 32 inputs in a row. Four-bit ones
are asymmetric, w = code * scale + minimum with codes 0..15 and a float16 minimum per group (GGUF's Q4_1 exactly;
Q4_0 is the case minimum = -8 scale); eight-bit ones symmetric, w = code * scale with codes -127..127 (GGUF's
Q8_0 exactly).
"""
from dataclasses import dataclass

import numpy as np
import torch

GROUP_SIZE = 32  # GGUF's block size; quantizing on load uses the same


@dataclass
class QuantizedTensor:
    """A [rows, columns] weight as integer codes with scales (and minimums for four bits): float32 tensors holding
    float16 values."""

    codes: torch.Tensor  # [rows, columns]: uint8 0..15 (bits 4) or int8 (bits 8)
    scales: torch.Tensor  # [rows, groups] float32
    minimums: torch.Tensor | None  # [rows, groups] float32 for bits 4, None for bits 8
    bits: int

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def group_size(self) -> int:
        return self.codes.shape[1] // self.scales.shape[1]

    @property
    def fits_kernel(self) -> bool:
        """Whether the kernels take these codes as they are: groups of GROUP_SIZE."""
        return self.group_size == GROUP_SIZE

    def dequantize(self) -> torch.Tensor:
        """The float32 weight these codes stand for (the reference the kernels are tested against)."""
        rows, columns = self.codes.shape
        grouped = self.codes.float().reshape(rows, -1, self.group_size) * self.scales[..., None]
        if self.minimums is not None:
            grouped = grouped + self.minimums[..., None]
        return grouped.reshape(rows, columns)

    def __getitem__(self, order: torch.Tensor) -> "QuantizedTensor":
        """The rows `order` (as a float tensor would index them): GGUF's rope rows put back in rotate-half order."""
        minimums = None if self.minimums is None else self.minimums[order]
        return QuantizedTensor(self.codes[order], self.scales[order], minimums, self.bits)

    def parts(self) -> dict[str, torch.Tensor]:
        """The buffers a quantized linear layer is loaded from, by name."""
        parts = {"codes": self.codes, "scales": self.scales}
        if self.minimums is not None:
            parts["minimums"] = self.minimums
        return parts


def quantize(weight: torch.Tensor, bits: int, group_size: int = GROUP_SIZE) -> QuantizedTensor:
    """Quantize a float weight on load, per group of `group_size` inputs: four bits min-max, eight bits absmax.
    Scales and minimums are rounded to float16 (as GGUF stores them and the CPU kernel reads them) before the
    codes are chosen."""
    weight = weight.float()
    rows, columns = weight.shape
    grouped = weight.reshape(rows, columns // group_size, group_size)
    tiny = torch.finfo(torch.float32).tiny
    if bits == 8:
        scales = (grouped.abs().amax(-1) / 127).half().float()
        codes = (grouped / scales.clamp(min=tiny)[..., None]).round().clamp(-127, 127).to(torch.int8)
        return QuantizedTensor(codes.reshape(rows, columns), scales, None, 8)
    minimums, maximums = grouped.amin(-1).half().float(), grouped.amax(-1)
    scales = ((maximums - minimums) / 15).half().float()
    codes = ((grouped - minimums[..., None]) / scales.clamp(min=tiny)[..., None]).round().clamp(0, 15).to(torch.uint8)
    return QuantizedTensor(codes.reshape(rows, columns), scales, minimums, 4)


def can_quantize(shape: torch.Size, bits: int) -> bool:
    """Whether a weight fits the kernels' layout: a matrix whose rows split into whole groups."""
    return len(shape) == 2 and shape[1] % GROUP_SIZE == 0


def decode_gguf_q4(blocks: np.ndarray, rows: int, with_minimum: bool) -> QuantizedTensor:
    """Q4_0 (scale, 16 bytes of codes) or Q4_1 (scale, minimum, 16 bytes): each block's low nibbles are its
    first 16 values, the high nibbles the last 16. Codes and scales are kept exactly as stored."""
    header = 4 if with_minimum else 2
    blocks = blocks.reshape(-1, header + GROUP_SIZE // 2)
    scales = torch.from_numpy(blocks[:, :2].copy().view(np.float16).astype(np.float32))
    packed = torch.from_numpy(blocks[:, header:].copy())
    codes = torch.cat([packed & 0x0F, packed >> 4], dim=1).reshape(rows, -1)
    scales = scales.reshape(rows, -1)
    if with_minimum:
        minimums = torch.from_numpy(blocks[:, 2:4].copy().view(np.float16).astype(np.float32)).reshape(rows, -1)
    else:
        minimums = -8 * scales
    return QuantizedTensor(codes, scales, minimums, 4)


def decode_gguf_q8(blocks: np.ndarray, rows: int) -> QuantizedTensor:
    """Q8_0 (a float16 scale, then 32 signed bytes per block): codes and scales kept exactly as stored."""
    blocks = blocks.reshape(-1, 2 + GROUP_SIZE)
    scales = torch.from_numpy(blocks[:, :2].copy().view(np.float16).astype(np.float32)).reshape(rows, -1)
    codes = torch.from_numpy(blocks[:, 2:].copy().view(np.int8)).reshape(rows, -1)
    return QuantizedTensor(codes, scales, None, 8)
