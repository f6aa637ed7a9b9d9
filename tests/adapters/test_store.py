import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from loraserve.adapters.errors import AdapterFormatError, AdapterNameError
from loraserve.adapters.format import inspect_adapter
from loraserve.adapters.server_path import checked_source_files
from loraserve.adapters.store import AdapterStore, validate_name
from tests.adapters.helpers import BASE, WEIGHTS

BAD_NAMES = ["", ".hidden", "..", "../evil", "a/b", "a\\b", "a..b", "x" * 65, "with space", "new\nline", "é"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(AdapterNameError):
        validate_name(name)


@pytest.mark.parametrize("name", ["a", "my-adapter_v1.2", "A.b-c_d", "x" * 64, "-dash"])
def test_safe_names_are_accepted(name: str) -> None:
    assert validate_name(name) == name


def test_stage_copy_and_commit_place_a_version(make_adapter: Callable[..., Path], tmp_path: Path) -> None:
    store, source = AdapterStore(tmp_path / "store"), make_adapter()
    staging = store.stage_copy(checked_source_files(source, max_bytes=1 << 20), max_bytes=1 << 20)
    assert (source / WEIGHTS).exists() and staging.parent == store.root
    stored = store.commit(staging, "tuned", 3, inspect_adapter(staging, BASE, max_rank=8))
    assert stored.directory == store.root / "tuned" / "v3" and not staging.exists()
    assert sorted(path.name for path in stored.directory.iterdir()) == ["adapter_config.json", WEIGHTS]
    assert store.versions("tuned") == [3]
    with store.scratch() as scratch:
        taken = Path(shutil.copytree(make_adapter(), scratch / "upload"))
        moved = store.stage(taken)
        assert not (taken / WEIGHTS).exists() and (moved / WEIGHTS).exists()
    assert not scratch.exists() and scratch.parent == store.root


def test_a_scratch_directory_a_crash_left_is_removed_at_start_up(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "store")
    with store.scratch() as scratch:
        (scratch / WEIGHTS).write_bytes(b"half an upload")
        AdapterStore(store.root).scan(BASE, max_rank=8)  # what a restarted server does first
        assert not scratch.exists()


def test_stage_of_pickled_only_adapter_copies_nothing(make_adapter: Callable[..., Path], tmp_path: Path) -> None:
    store, source = AdapterStore(tmp_path / "store"), make_adapter()
    (source / WEIGHTS).rename(source / "adapter_model.bin")
    with pytest.raises(AdapterFormatError, match="pickled"):
        store.stage(source)
    assert list(store.root.iterdir()) == []


def test_scan_keeps_latest_valid_versions_and_cleans_leftovers(make_adapter: Callable[..., Path], tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "store"
    for name, version in [("alpha", 1), ("alpha", 2), ("beta", 1), ("beta", 2)]:
        shutil.copytree(make_adapter(seed=version), root / name / f"v{version}")
    (root / "beta" / "v2" / WEIGHTS).write_bytes(b"broken")  # beta falls back to v1, v2 is left for inspection
    (root / ".tmp-crashed").mkdir()
    (root / "not a name").mkdir()
    (root / "stray.txt").write_text("")
    with caplog.at_level(logging.WARNING):
        found = AdapterStore(root).scan(BASE, max_rank=8)
    assert [(stored.name, stored.version) for stored in found] == [("alpha", 2), ("beta", 1)]
    assert found[0].info.targets == ["q_proj", "v_proj"] and found[0].created_at > 0
    assert not (root / ".tmp-crashed").exists() and not (root / "alpha" / "v1").exists()
    assert (root / "beta" / "v2").exists() and (root / "not a name").exists()
    assert "skipping adapter beta version 2" in caplog.text and "not a name" in caplog.text
