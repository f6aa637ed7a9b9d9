"""Kernel tests run Triton on the CPU through its interpreter unless a GPU is present.

The variable must be set before triton is first imported, hence at conftest import time.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
