"""The CPU's weight-only kernel (`cpu_quantized.cpp`): four-bit codes with a scale and minimum per group of 32, or
eight-bit codes with a scale per group of 32 (GGUF's Q4_1, Q4_0 and Q8_0 as stored), times int16-quantized
activations, with output rows in the vector lanes. PyTorch's `_weight_int4pack_mm_for_cpu` reads the same four-bit
weights at a fraction of this machine's bandwidth for a decode's few rows and takes only bfloat16 activations, and
its `_weight_int8pack_mm` has no group scales. Built like the other C++ kernels (`cpp_extension`); until it is,
layers fall back to PyTorch (see `QuantizedLinear`)."""
from pathlib import Path

import torch
import torch.nn.functional as F

from loraserve.kernels.cpp_extension import BackgroundExtension

KERNEL = BackgroundExtension("cpu_quantized", Path(__file__).with_name("cpu_quantized.cpp"))
GROUP_SIZE = 32
TILE = 16  # output rows per tile of the kernel's layout


def pack(codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor | None,
         bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [out, in] (uint8 0..15 for four bits, int8 for eight), scales and minimums (four bits only)
    [out, in / 32] -> the kernel's tiled layout (see cpu_quantized.cpp): codes [tiles, groups * bytes] and scales
    [tiles, groups * 16 (32 with minimums)] float16, rows padded to whole tiles with zeros. Scales and minimums
    must be float16 values already (GGUF's are; `quantize` rounds its own)."""
    rows, columns = codes.shape
    groups, padding = columns // GROUP_SIZE, -rows % TILE
    tiles = (rows + padding) // TILE
    codes = F.pad(codes.view(torch.uint8), (0, 0, 0, padding))
    if bits == 4:  # input 4 c + 2 q + b of a group: chunk c, nibble q (low, high), byte 2 r + b for tile row r
        nibbles = codes.reshape(tiles, TILE, groups, GROUP_SIZE // 4, 2, 2).permute(0, 2, 3, 4, 1, 5)
        nibbles = nibbles.reshape(tiles, groups, GROUP_SIZE // 4, 2, 2 * TILE)
        packed = nibbles[:, :, :, 0] | (nibbles[:, :, :, 1] << 4)
    else:  # input 2 c + b of a group: chunk c, byte 2 r + b
        packed = codes.reshape(tiles, TILE, groups, GROUP_SIZE // 2, 2).permute(0, 2, 3, 1, 4)
    parts = [scales] if minimums is None else [scales, minimums]
    halves = torch.stack(parts, -1).to(torch.float16)
    if not torch.equal(halves.float(), torch.stack(parts, -1).float()):
        raise ValueError("scales and minimums must be float16 values")
    halves = F.pad(halves, (0, 0, 0, 0, 0, padding)).reshape(tiles, TILE, groups, len(parts)).permute(0, 2, 3, 1)
    return packed.reshape(tiles, -1).contiguous(), halves.reshape(tiles, -1).contiguous()


def unpack(codes: torch.Tensor, scales: torch.Tensor, bits: int, out_features: int) -> tuple[torch.Tensor, ...]:
    """`pack`'s inverse: (codes [out, in], scales [out, groups]), and minimums for four bits."""
    tiles, parts = codes.shape[0], 2 if bits == 4 else 1
    groups = scales.shape[1] // (TILE * parts)
    if bits == 4:
        chunks = codes.reshape(tiles, groups, GROUP_SIZE // 4, 1, 2 * TILE)
        nibbles = torch.cat([chunks & 0x0F, chunks >> 4], dim=3).reshape(tiles, groups, GROUP_SIZE // 4, 2, TILE, 2)
        rows = nibbles.permute(0, 4, 1, 2, 3, 5)
    else:
        rows = codes.reshape(tiles, groups, GROUP_SIZE // 2, TILE, 2).permute(0, 3, 1, 2, 4).view(torch.int8)
    halves = scales.reshape(tiles, groups, parts, TILE).permute(0, 3, 1, 2).reshape(tiles * TILE, groups, parts)
    unpacked = rows.reshape(tiles * TILE, groups * GROUP_SIZE)[:out_features]
    return unpacked, *halves[:out_features].float().unbind(-1)
