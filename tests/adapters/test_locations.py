"""Adapters named by their path: read only inside the allowed roots, copied in once, again when they change."""
import os
from pathlib import Path

import fsspec
import pytest

from loraserve.adapters.errors import AdapterLocationError, AdapterNotFoundError
from loraserve.adapters.locations import AdapterLocations
from tests.adapters.helpers import WEIGHTS, MakeAdapter, MakeRegistry


@pytest.fixture
def root(make_adapter: MakeAdapter, tmp_path: Path) -> Path:
    root = tmp_path / "allowed"
    root.mkdir()
    make_adapter().rename(root / "adapter")
    return root


def test_a_location_inside_a_root_is_copied_in_once_and_again_when_it_changes(make_registry: MakeRegistry,
                                                                             root: Path) -> None:
    registry, _ = make_registry()
    locations = AdapterLocations(registry, [str(root)])
    first = locations.resolve(str(root / "adapter"))
    assert locations.resolve(str(root / "adapter")) == first  # unchanged: the same version, not copied again
    weights = root / "adapter" / WEIGHTS
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    second = locations.resolve(str(root / "adapter"))
    assert (second.name, second.version) == (first.name, first.version + 1)
    assert [record.name for record in registry.records()] == [first.name]
    for ref in (first, first, second):
        registry.unpin(ref)


def test_locations_outside_the_roots_are_refused(make_registry: MakeRegistry, root: Path, tmp_path: Path) -> None:
    registry, _ = make_registry()
    outside = tmp_path / "outside"
    (root / "adapter").rename(outside)
    (root / "link").symlink_to(outside)  # inside by its name, outside once resolved
    locations = AdapterLocations(registry, [str(root)])
    for location in (str(outside), str(root / "link"), f"{root}/../outside", "adapter"):
        with pytest.raises(AdapterLocationError):
            locations.resolve(location)
    with pytest.raises(AdapterNotFoundError):
        locations.resolve(str(root / "missing"))
    with pytest.raises(AdapterLocationError, match="--adapter-roots"):
        AdapterLocations(registry, []).resolve(str(outside))
    assert registry.records() == [] and registry.num_pins() == 0


def test_a_location_in_an_allowed_object_store_is_read_through_fsspec(make_registry: MakeRegistry,
                                                                      make_adapter: MakeAdapter,
                                                                      tmp_path: Path) -> None:
    """fsspec's in-memory store stands for s3:// or gs:// (same calls, no credentials)."""
    registry, _ = make_registry()
    store = fsspec.filesystem("memory")
    root, source = f"memory://{tmp_path.name}/allowed", make_adapter()
    for file in source.iterdir():
        store.pipe_file(f"/{tmp_path.name}/allowed/team/adapter/{file.name}", file.read_bytes())
    locations = AdapterLocations(registry, [root])
    first = locations.resolve(f"{root}/team/adapter")
    assert locations.resolve(f"{root}/team/adapter/") == first  # unchanged: not copied again
    for file in make_adapter(rank=2).iterdir():  # retrained: another rank, so other files
        store.pipe_file(f"/{tmp_path.name}/allowed/team/adapter/{file.name}", file.read_bytes())
    assert locations.resolve(f"{root}/team/adapter").version == first.version + 1
    for location in (f"{root}/team/../../elsewhere", f"memory://{tmp_path.name}/allowed-not/adapter",
                     "memory://other/adapter"):
        with pytest.raises(AdapterLocationError):
            locations.resolve(location)
    with pytest.raises(AdapterNotFoundError):
        locations.resolve(f"{root}/team/missing")
