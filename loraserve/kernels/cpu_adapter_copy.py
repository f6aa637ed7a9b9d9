"""The CPU's adapter copies (`cpu_adapter_copy.cpp`): the finite check of a loaded adapter and its write into the
page pool, one pass over the weights each. Until the build is ready (or without a compiler) the adapter code uses
its torch forms, which give the same bits at about a quarter of the speed."""
from pathlib import Path

from loraserve.kernels.cpp_extension import BackgroundExtension

KERNEL = BackgroundExtension("cpu_adapter_copy", Path(__file__).with_name("cpu_adapter_copy.cpp"))
