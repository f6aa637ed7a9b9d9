"""An object store as the adapter store several servers share (fsspec; file:// here): what one places, the others
read into their own directories and serve; new versions and deletes reach them; half-written versions do not."""
from pathlib import Path

import pytest
import torch

import loraserve.adapters.remote_store as remote_store
from loraserve.adapters.errors import AdapterNotFoundError
from loraserve.adapters.registry import AdapterRegistry
from loraserve.adapters.slot_pool import SlotPool
from tests.adapters.helpers import BASE, MAX_RANK, MakeAdapter


@pytest.fixture(params=["file", "memory"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A local directory, and fsspec's in-memory store, which has no directories, as object stores have none."""
    return f"file://{tmp_path / 'bucket'}" if request.param == "file" else f"memory://{tmp_path.name}/bucket"


@pytest.fixture
def make_server(tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch):
    """A registry with a directory of its own over the one object store."""
    monkeypatch.setattr(remote_store, "LISTING_TTL_S", 0.0)  # list at every look: what a later request sees
    url = store_url

    def make(label: str) -> AdapterRegistry:
        pool = SlotPool(BASE, 2, 2 * MAX_RANK, MAX_RANK, torch.device("cpu"), torch.float32)
        return AdapterRegistry(tmp_path / label, BASE, pool, 4, MAX_RANK, remote_store=url)
    return make


def test_servers_on_one_object_store_take_up_each_others_versions_and_deletes(make_server, make_adapter: MakeAdapter,
                                                                              store_url: str, tmp_path: Path) -> None:
    first, second = make_server("first"), make_server("second")
    first.add("shared", make_adapter(seed=1))
    ref = second.resolve("shared")
    assert ref.version == 1 and (tmp_path / "second" / "shared" / "v1" / "adapter_model.safetensors").is_file()
    second.add("shared", make_adapter(seed=2))
    newer = first.resolve("shared")
    assert newer.version == 2 and first.record("shared").version == 2
    first.remove("shared")
    with pytest.raises(AdapterNotFoundError):
        second.resolve("shared")
    for registry, held in ((second, ref), (first, newer)):
        registry.unpin(held)
    assert remote_store.RemoteStore(store_url).names() == []


def test_a_new_server_finds_the_stores_adapters_and_skips_half_written_versions(make_server, store_url: str,
                                                                                make_adapter: MakeAdapter) -> None:
    make_server("first").add("kept", make_adapter())
    store = remote_store.RemoteStore(store_url)  # a version's files without the marker: an upload cut short
    store.filesystem.makedirs(f"{store.root}/kept/v2", exist_ok=True)
    store.filesystem.pipe_file(f"{store.root}/kept/v2/adapter_config.json", b"{}")
    later = make_server("later")
    assert [(record.name, record.version) for record in later.records()] == [("kept", 1)]
    ref = later.resolve("kept")
    assert ref.version == 1
    later.unpin(ref)
