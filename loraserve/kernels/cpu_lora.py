"""The CPU LoRA kernel (`cpu_lora.cpp`): every group of tokens of a projection in one call.

On this kind of machine a small matrix product costs ~20 us however little it computes, so a per-adapter loop
(4 projections x 30 layers x adapters) costs more than the arithmetic by far, and neither a grouped matrix product
(`torch._grouped_mm` needs one rank for all) nor Inductor's loops (a few GFLOP/s) avoid it. PyTorch has no grouped
LoRA operator for the CPU, so this one is ours: built with the machine's own compiler on first use (about a minute,
in the background, while steps use per-adapter matrix products; later processes load the cached build).
"""
import logging
import threading
import time
from pathlib import Path
from types import ModuleType

from loraserve.intra_op_threads import hold_helper_to_one_thread

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_lora.cpp")
# -march=native: the build is cached per machine and run where it was built. -fopenmp: at::parallel_for then runs
# on torch's own OpenMP pool (libtorch's libgomp), the same threads the steps use.
FLAGS = ["-O3", "-march=native", "-fopenmp"]


class CpuLoraKernel:
    """Builds the extension once per process, on a background thread; `get` returns it once loaded."""

    def __init__(self) -> None:
        self.module: ModuleType | None = None
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._started = False

    def get(self) -> ModuleType | None:
        """The loaded extension, or None while it builds or if it cannot be built; starts the build."""
        if not self._started:
            self.start()
        return self.module

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self._build, name="loraserve-lora-build", daemon=True).start()

    def _build(self) -> None:
        started = time.perf_counter()
        try:
            # Imported here: cpp_extension pulls in setuptools, which a server without adapters never needs.
            from torch.utils.cpp_extension import load
            hold_helper_to_one_thread()
            logger.info("building the CPU LoRA kernel (about a minute the first time; cached after)")
            self.module = load(name="loraserve_cpu_lora", sources=[str(SOURCE)], extra_cflags=FLAGS)
            logger.info("CPU LoRA kernel ready in %.1f s", time.perf_counter() - started)
        except Exception:  # noqa: BLE001 - without a compiler the per-adapter matrix products still work
            logger.warning("building the CPU LoRA kernel failed; adapters use per-adapter matrix products",
                           exc_info=True)
        finally:
            self.done.set()


KERNEL = CpuLoraKernel()
