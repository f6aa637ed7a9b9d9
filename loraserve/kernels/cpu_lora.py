"""The CPU LoRA kernel (`cpu_lora.cpp`): every group of tokens of a projection in one call.

On this kind of machine a small matrix product costs ~20 us however little it computes, so a per-adapter loop
(4 projections x 30 layers x adapters) costs more than the arithmetic by far, and neither a grouped matrix product
(`torch._grouped_mm` needs one rank for all) nor Inductor's loops (a few GFLOP/s) avoid it. PyTorch has no grouped
LoRA operator for the CPU, so this one is ours: built with the machine's own compiler on first use (about a minute,
in the background, while steps use per-adapter matrix products; later processes load the cached build).
"""
from pathlib import Path

from loraserve.kernels.cpp_extension import BackgroundExtension

KERNEL = BackgroundExtension("cpu_lora", Path(__file__).with_name("cpu_lora.cpp"))
