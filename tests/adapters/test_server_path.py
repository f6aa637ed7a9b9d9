"""vLLM's load route names a directory on the server: it is checked where it lies, and its failures say nothing of
what exists there."""
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from loraserve.adapters.errors import AdapterFormatError, AdapterTooLargeError
from loraserve.adapters.server_path import NOT_AN_ADAPTER, checked_source_files, copy_regular_file
from tests.adapters.helpers import WEIGHTS

CONFIG = "adapter_config.json"


def test_an_adapter_directory_passes(make_adapter: Callable[..., Path]) -> None:
    source = make_adapter()
    files = checked_source_files(source, max_bytes=1 << 20)
    assert files == {CONFIG: (source / CONFIG).resolve(), WEIGHTS: (source / WEIGHTS).resolve()}


def test_a_link_inside_the_directory_is_followed(make_adapter: Callable[..., Path]) -> None:
    source = make_adapter()
    (source / WEIGHTS).rename(source / "blob")
    (source / WEIGHTS).symlink_to("blob")
    assert checked_source_files(source, max_bytes=1 << 20)[WEIGHTS] == (source / "blob").resolve()


def leading_out(source: Path) -> None:
    (source / WEIGHTS).unlink()
    (source / WEIGHTS).symlink_to("/proc/self/mem")


def missing_weights(source: Path) -> None:
    (source / WEIGHTS).unlink()


def pickled_weights(source: Path) -> None:
    (source / WEIGHTS).rename(source / "adapter_model.bin")


def weights_a_directory(source: Path) -> None:
    (source / WEIGHTS).unlink()
    (source / WEIGHTS).mkdir()


def a_loop(source: Path) -> None:
    (source / WEIGHTS).unlink()
    (source / WEIGHTS).symlink_to(WEIGHTS)


@pytest.mark.parametrize("spoil", [leading_out, missing_weights, pickled_weights, weights_a_directory, a_loop])
def test_every_way_of_not_being_an_adapter_gets_one_message(make_adapter: Callable[..., Path], spoil) -> None:
    source = make_adapter()
    spoil(source)
    with pytest.raises(AdapterFormatError) as refused:
        checked_source_files(source, max_bytes=1 << 20)
    assert str(refused.value) == NOT_AN_ADAPTER


@pytest.mark.parametrize("path", ["/nonexistent/adapter", "/etc", "/etc/passwd", "/proc/self"])
def test_paths_elsewhere_get_the_same_message(path: str) -> None:
    with pytest.raises(AdapterFormatError) as refused:
        checked_source_files(Path(path), max_bytes=1 << 20)
    assert str(refused.value) == NOT_AN_ADAPTER


def test_the_size_limit_counts_both_files(make_adapter: Callable[..., Path]) -> None:
    source = make_adapter()
    size = sum(os.path.getsize(source / name) for name in (CONFIG, WEIGHTS))
    checked_source_files(source, max_bytes=size)
    with pytest.raises(AdapterTooLargeError):
        checked_source_files(source, max_bytes=size - 1)


def test_a_copy_refuses_a_file_that_grew_or_became_a_link(make_adapter: Callable[..., Path], tmp_path: Path) -> None:
    source = make_adapter()
    size = os.path.getsize(source / WEIGHTS)
    assert copy_regular_file(source / WEIGHTS, tmp_path / "copy", size) == size
    with pytest.raises(AdapterTooLargeError):
        copy_regular_file(source / WEIGHTS, tmp_path / "copy", size - 1)
    (tmp_path / "link").symlink_to(source / WEIGHTS)
    with pytest.raises(OSError):
        copy_regular_file(tmp_path / "link", tmp_path / "copy", size)
