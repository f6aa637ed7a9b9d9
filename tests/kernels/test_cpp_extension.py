"""Built C++ kernels are cached by content: a later process loads the build without a compiler, and what a killed
build leaves behind (torch's lock file in its own cache) stops nothing."""
from pathlib import Path

import pytest
import torch.utils.cpp_extension

from loraserve.kernels import cpp_extension
from loraserve.kernels.cpp_extension import BackgroundExtension, cache_directory
from loraserve.kernels.cpu_lora import KERNEL



def never_build(*args, **kwargs):
    raise AssertionError("the cached build should have been loaded")


def test_a_second_process_loads_the_cached_build_without_building(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.utils.cpp_extension, "load", never_build)
    again = BackgroundExtension("cpu_lora", KERNEL.source)
    again.start()
    assert again.done.wait(timeout=60)
    assert again.module is not None and again.module.add_lora_groups.__doc__ == KERNEL.module.add_lora_groups.__doc__
    assert [path.name for path in cache_directory().glob("loraserve_cpu_lora_*.so")]


def test_an_edited_source_is_built_afresh_not_loaded_from_the_cache(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch):
    built = []
    monkeypatch.setattr(cpp_extension.BackgroundExtension, "_build",
                        lambda self, name, cached: built.append(name) or KERNEL.module)
    edited = tmp_path / "cpu_lora.cpp"
    edited.write_text(KERNEL.source.read_text() + "\n// edited\n")
    extension = BackgroundExtension("cpu_lora", edited)
    extension.start()
    assert extension.done.wait(timeout=60) and extension.module is KERNEL.module
    assert len(built) == 1 and not (cache_directory() / f"{built[0]}.so").exists()
