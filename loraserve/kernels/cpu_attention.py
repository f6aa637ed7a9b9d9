"""The CPU's paged attention for short queries (`cpu_attention.cpp`): decodes and verified drafts read the paged
cache in place, one call per layer, instead of the torch path's gather, padding, mask and masked SDPA. Prefill
chunks keep the torch path, whose SDPA is blocked matrix products. Built like the LoRA kernel (`cpp_extension`)."""
from pathlib import Path

from loraserve.kernels.cpp_extension import BackgroundExtension

KERNEL = BackgroundExtension("cpu_attention", Path(__file__).with_name("cpu_attention.cpp"))
# The longest query (tokens of one sequence in a step) sent to the kernel: a decode with a few drafts.
SHORT_QUERY = 16
