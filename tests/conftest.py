"""Triton runs on the CPU through its interpreter unless a GPU is present.

The variable must be set before triton is first imported (other test packages import libraries that import it),
hence here, in the root conftest, which pytest imports before any test module. The CPU LoRA kernel's fixture is
here too: kernel and engine tests share it.
"""
import os

import pytest
import torch

from loraserve.kernels.cpu_lora import KERNEL

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def built_cpu_lora_kernel() -> None:
    """The CPU LoRA kernel builds in the background (steps use per-adapter matrix products until then); tests
    that check the kernel wait for it, and fail without it: CI has a compiler."""
    KERNEL.start()
    assert KERNEL.done.wait(timeout=600) and KERNEL.get() is not None
