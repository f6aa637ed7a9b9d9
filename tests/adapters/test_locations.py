"""Adapters named by their path: read only inside the allowed roots, copied in once, again when they change."""
import os
from pathlib import Path

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
    locations = AdapterLocations(registry, [root])
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
    locations = AdapterLocations(registry, [root])
    for location in (str(outside), str(root / "link"), f"{root}/../outside", "adapter"):
        with pytest.raises(AdapterLocationError):
            locations.resolve(location)
    with pytest.raises(AdapterNotFoundError):
        locations.resolve(str(root / "missing"))
    with pytest.raises(AdapterLocationError, match="--adapter-roots"):
        AdapterLocations(registry, []).resolve(str(outside))
    assert registry.records() == [] and registry.num_pins() == 0
