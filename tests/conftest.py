"""Triton runs on the CPU through its interpreter unless a GPU is present.

The variable must be set before triton is first imported (other test packages import libraries that import it),
hence here, in the root conftest, which pytest imports before any test module. The CPU kernels' fixture is here
too: every test runs with them built, as a server soon does, so no test's numbers depend on how far a build got.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():  # before anything imports triton (llguidance's torch module does, through Inductor)
    os.environ["TRITON_INTERPRET"] = "1"

from loraserve.kernels import cpu_adapter_copy, cpu_attention, cpu_lora, cpu_quantized, fused, token_mask  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def built_cpu_kernels() -> None:
    """The C++ kernels build in the background (steps use the torch paths until then); tests wait for them, and
    fail without them: CI has a compiler."""
    kernels = (cpu_lora.KERNEL, cpu_attention.KERNEL, cpu_quantized.KERNEL, fused.KERNEL, cpu_adapter_copy.KERNEL,
               token_mask.KERNEL)
    for kernel in kernels:
        kernel.start()
    for kernel in kernels:
        assert kernel.done.wait(timeout=600) and kernel.get() is not None, f"the {kernel.name} kernel did not build"
