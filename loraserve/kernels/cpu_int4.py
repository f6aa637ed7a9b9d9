"""The CPU's 4-bit weight kernel (`cpu_int4.cpp`): grouped codes with scales and minimums times int16-quantized
activations, integer dot products per group as llama.cpp runs Q4_1. PyTorch's `_weight_int4pack_mm_for_cpu` reads
the same weights at a fraction of this machine's bandwidth for a decode's few rows, and takes only bfloat16
activations (two conversions a call). Built like the other C++ kernels (`cpp_extension`); until it is, layers use
PyTorch's kernel."""
from pathlib import Path

import torch

from loraserve.kernels.cpp_extension import BackgroundExtension

KERNEL = BackgroundExtension("cpu_int4", Path(__file__).with_name("cpu_int4.cpp"))
GROUP_SIZE = 32


def pack_int4(codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [out, in] (0..15), scales and minimums [out, in / 32] -> the kernel's codes [out, in / 2], byte j of a
    group holding code j and code j + 16, and its scales and minimums side by side [out, in / 32, 2]."""
    rows, columns = codes.shape
    halves = codes.to(torch.uint8).reshape(rows, columns // GROUP_SIZE, 2, GROUP_SIZE // 2)
    packed = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(rows, columns // 2)
    return packed.contiguous(), torch.stack([scales, minimums], -1).float().contiguous()
