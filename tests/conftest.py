"""Triton runs on the CPU through its interpreter unless a GPU is present.

The variable must be set before triton is first imported (other test packages import libraries that import it),
hence here, in the root conftest, which pytest imports before any test module.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
