import itertools
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.adapters.helpers import save_peft_adapter


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
