import itertools
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from loraserve.adapters.registry import AdapterRegistry
from loraserve.adapters.slot_pool import SlotPool
from tests.adapters.helpers import BASE, MAX_RANK, EventLog, MakeRegistry, save_peft_adapter


@pytest.fixture(scope="session")
def saved_adapter(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """A PEFT adapter saved once per session for each distinct set of settings; read-only to tests."""
    root = tmp_path_factory.mktemp("peft")
    saved: dict[str, Path] = {}

    def save(**settings: Any) -> Path:
        key = repr(sorted(settings.items()))
        if key not in saved:
            saved[key] = save_peft_adapter(root / f"adapter{len(saved)}", **settings)
        return saved[key]
    return save


@pytest.fixture
def make_adapter(saved_adapter: Callable[..., Path], tmp_path: Path) -> Callable[..., Path]:
    """A fresh copy of a saved PEFT adapter, which the test may edit, break or hand over to `add`."""
    counter = itertools.count()

    def make(**settings: Any) -> Path:
        return Path(shutil.copytree(saved_adapter(**settings), tmp_path / f"source{next(counter)}"))
    return make


@pytest.fixture
def make_registry(tmp_path: Path) -> MakeRegistry:
    """A registry over tmp_path/adapters, and its slot pool to look into."""
    def make(num_slots: int = 2, max_cpu_loras: int = 4, listener: EventLog | None = None,
             num_pages: int | None = None) -> tuple[AdapterRegistry, SlotPool]:
        pool = SlotPool(BASE, num_slots, num_pages or num_slots * MAX_RANK, MAX_RANK, torch.device("cpu"),
                        torch.float32)
        return AdapterRegistry(tmp_path / "adapters", BASE, pool, max_cpu_loras, MAX_RANK, listener), pool
    return make
