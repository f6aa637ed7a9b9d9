"""A grammar's token bitmask (llguidance's layout: int32 words, bit t % 32 of word t // 32 set where token t is
allowed) applied to logits: -inf where forbidden. On the CPU one C++ pass (`cpu_token_mask.cpp`); on CUDA
llguidance's own kernel; until the C++ build is ready, the torch form here, which is also its reference."""
from pathlib import Path

import llguidance.torch as llguidance_torch
import torch

from loraserve.kernels.cpp_extension import BackgroundExtension

KERNEL = BackgroundExtension("cpu_token_mask", Path(__file__).with_name("cpu_token_mask.cpp"))
BITS = (torch.ones(32, dtype=torch.int64) << torch.arange(32)).to(torch.int32)  # bit 31 wraps to int32's minimum


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place, on float32 logits with a bitmask row per logits row (the bitmask on the CPU)."""
    if logits.is_cuda:
        llguidance_torch.apply_token_bitmask_inplace(logits, bitmask.to(logits.device))
    elif (kernel := KERNEL.get()) is not None:
        kernel.apply_token_bitmask(logits, bitmask)
    else:
        apply_token_bitmask_reference(logits, bitmask)


def apply_token_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    allowed = (bitmask.unsqueeze(-1) & BITS).ne(0).view(bitmask.shape[0], -1)[:, :logits.shape[1]]
    logits.masked_fill_(~allowed, float("-inf"))
