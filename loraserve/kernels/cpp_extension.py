"""Our C++ CPU kernels, built with the machine's own compiler on first use, on a background thread, and cached.

The cache is keyed by the source's content, torch's version, the flags and the CPU (the build is `-march=native`),
so checkouts in different places share one build, and neither an edited source nor another CPU (a home directory
shared between machines) ever loads a stale one. Each build runs in a directory of its own and its result
is moved into the cache in one rename: a server killed mid-build (or two building at once) can leave nothing
half-written behind. torch's own `load` cache is keyed by the source's path and guarded by a lock file that a
killed build leaves in place, after which every later build waits forever, silently.
"""
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

from loraserve.intra_op_threads import hold_helper_to_one_thread

logger = logging.getLogger(__name__)

# -march=native: the build is cached per machine and run where it was built. -fopenmp: at::parallel_for then runs
# on torch's own OpenMP pool (libtorch's libgomp), the same threads the steps use.
FLAGS = ["-O3", "-march=native", "-fopenmp"]
CACHE_VARIABLE = "LORASERVE_KERNEL_CACHE"


def cache_directory() -> Path:
    return Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "loraserve" / "kernels")


class BackgroundExtension:
    """One C++ source built once per machine; `get` returns the module once loaded, None until then (or if it
    cannot be built: callers keep a torch path for that)."""

    def __init__(self, name: str, source: Path) -> None:
        self.name, self.source = name, source
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
        threading.Thread(target=self._load, name=f"loraserve-build-{self.name}", daemon=True).start()

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            hold_helper_to_one_thread()
            key = hashlib.sha256(b"\0".join([self.source.read_bytes(), torch.__version__.encode(),
                                             " ".join(FLAGS).encode(), cpu_signature()])).hexdigest()[:16]
            module_name = f"loraserve_{self.name}_{key}"
            cached = cache_directory() / f"{module_name}.so"
            if cached.exists():
                self.module = _import(module_name, cached)
            else:
                logger.info("building the %s kernel (about a minute, once per machine)", self.name)
                self.module = self._build(module_name, cached)
            logger.info("%s kernel ready in %.1f s", self.name, time.perf_counter() - started)
        except Exception:  # noqa: BLE001 - without a compiler the torch paths still work
            logger.warning("building the %s kernel failed; the plain torch path is used", self.name, exc_info=True)
        finally:
            self.done.set()

    def _build(self, module_name: str, cached: Path) -> ModuleType:
        # Imported here: cpp_extension pulls in setuptools, which a server that never builds does not need.
        from torch.utils.cpp_extension import load
        cached.parent.mkdir(parents=True, exist_ok=True)
        for stale in cached.parent.glob("loraserve_*-*"):  # builds killed midway, an hour or more ago
            if stale.is_dir() and time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=f"{module_name}-", dir=cached.parent) as build:
            module = load(name=module_name, sources=[str(self.source)], extra_cflags=FLAGS, build_directory=build,
                          is_python_module=True)
            staged = Path(build) / f"{module_name}.so.staged"
            shutil.copyfile(Path(build) / f"{module_name}.so", staged)
            os.replace(staged, cached)
        return module


def cpu_signature() -> bytes:
    """What `-march=native` compiles for: the CPU's model and instruction-set flags (Linux), else its name."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor().encode()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))})).encode()


def _import(module_name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
