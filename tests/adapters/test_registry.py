"""The registry's names and versions: adding, resolving, replacing and removing adapters while requests hold
them, uploads that fail, a restart that finds what was stored, and many threads at once."""
import threading
import time
from pathlib import Path

import pytest
import torch

from loraserve.adapters.errors import AdapterFormatError, AdapterNameError, AdapterNotFoundError
from loraserve.adapters.format import load_adapter
from loraserve.adapters.records import AdapterRef
from tests.adapters.helpers import (BASE, MAX_RANK, WEIGHTS, MakeAdapter, MakeRegistry, acquire, peft_q_a,
                                   slot_q_a)


def test_add_resolve_and_record(make_registry: MakeRegistry,
                                make_adapter: MakeAdapter) -> None:
    (registry, _), source = make_registry(), make_adapter(rank=4, alpha=8)
    record = registry.add("tuned", source)
    assert not (source / WEIGHTS).exists()  # add takes the files
    assert (record.name, record.version, record.rank, record.alpha) == ("tuned", 1, 4, 8.0)
    assert (record.targets, record.tier, record.requests_served) == (["q_proj", "v_proj"], "cpu", 0)
    ref = registry.resolve("tuned")
    assert ref == AdapterRef("tuned", 1)
    assert registry.waiting_for_load() == 1 and registry.slots_held() == 0
    registry.count_request(ref)
    slot = acquire(registry, ref)
    assert registry.record("tuned").tier == "gpu" and registry.record("tuned").requests_served == 1
    assert registry.waiting_for_load() == 0 and registry.slots_held() == 1
    kept = make_adapter(seed=5)
    assert registry.add_from_path("copied", kept).version == 1 and (kept / WEIGHTS).exists()
    assert [record.name for record in registry.records()] == ["copied", "tuned"]
    registry.release(ref)
    assert slot is not None and registry.num_references() == 0 and registry.num_pins() == 1
    registry.unpin(ref)
    assert registry.num_pins() == 0 and registry.record("tuned").tier == "gpu"  # a current version stays warm
    with pytest.raises(AdapterNotFoundError):
        registry.resolve("absent")


def files(directory: Path) -> list[str]:
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*") if path.is_file())


def test_new_version_serves_new_requests_while_old_holders_keep_theirs(
        make_registry: MakeRegistry, make_adapter: MakeAdapter, tmp_path: Path) -> None:
    registry, pool = make_registry()
    first, second = make_adapter(seed=1), make_adapter(seed=2)
    expected_first, expected_second = peft_q_a(first), peft_q_a(second)
    registry.add("tuned", first)
    old = registry.resolve("tuned")
    old_slot = acquire(registry, old)
    assert registry.add("tuned", second).version == 2
    new = registry.resolve("tuned")
    assert new == AdapterRef("tuned", 2)
    assert sorted(path.name for path in (tmp_path / "adapters" / "tuned").iterdir()) == ["v2"]
    assert acquire(registry, old) == old_slot  # still held, still there
    new_slot = acquire(registry, new)
    assert new_slot != old_slot
    assert torch.equal(slot_q_a(pool, old_slot), expected_first)
    assert torch.equal(slot_q_a(pool, new_slot), expected_second)
    registry.release(old)
    registry.release(old)
    assert registry.slots_in_use() == 2  # still pinned by its request, which may run again
    registry.unpin(old)
    assert registry.slots_in_use() == 1 and not slot_q_a(pool, old_slot).any()  # freed at the last use
    assert files(tmp_path / "adapters") == ["tuned/v2/adapter_config.json", f"tuned/v2/{WEIGHTS}"]
    with pytest.raises(AdapterNotFoundError, match="version 1 was replaced or removed"):
        acquire(registry, old)
    registry.release(new)
    registry.unpin(new)


def test_a_pinned_version_replaced_while_waiting_still_runs(make_registry: MakeRegistry,
                                                            make_adapter: MakeAdapter, tmp_path: Path) -> None:
    registry, pool = make_registry(max_cpu_loras=1)
    first = make_adapter(seed=1)
    expected = peft_q_a(first)
    registry.add("tuned", first)
    waiting = registry.resolve("tuned")
    registry.add("tuned", make_adapter(seed=2))  # v1 leaves the CPU cache and its name's directory
    assert registry.record("tuned").version == 2 and registry.record("tuned").tier == "cpu"
    slot = acquire(registry, waiting)  # read back from where v1 was moved
    assert torch.equal(slot_q_a(pool, slot), expected)
    registry.release(waiting)
    registry.unpin(waiting)
    assert files(tmp_path / "adapters") == ["tuned/v2/adapter_config.json", f"tuned/v2/{WEIGHTS}"]
    with pytest.raises(AdapterNotFoundError):
        registry.ensure_loaded(waiting)


def test_remove_hides_the_name_at_once_and_frees_after_the_last_request(
        make_registry: MakeRegistry, make_adapter: MakeAdapter, tmp_path: Path) -> None:
    (registry, pool), source = make_registry(), make_adapter()
    expected = peft_q_a(source)
    registry.add("tuned", source)
    running, waiting = registry.resolve("tuned"), registry.resolve("tuned")
    slot = acquire(registry, running)
    registry.remove("tuned")
    with pytest.raises(AdapterNotFoundError):
        registry.resolve("tuned")
    assert registry.records() == [] and not (tmp_path / "adapters" / "tuned").exists()
    assert registry.slots_in_use() == 1 and torch.equal(slot_q_a(pool, slot), expected)
    assert registry.add("tuned", make_adapter(seed=3)).version == 2  # never reuses a version still held
    registry.release(running)
    registry.unpin(running)
    assert acquire(registry, waiting) == slot  # the other request still gets the removed version
    registry.release(waiting)
    registry.unpin(waiting)
    assert registry.slots_in_use() == 0 and not slot_q_a(pool, slot).any()
    assert files(tmp_path / "adapters") == ["tuned/v2/adapter_config.json", f"tuned/v2/{WEIGHTS}"]
    with pytest.raises(AdapterNotFoundError):
        registry.remove("absent")


def test_a_dora_adapter_needs_the_base_weights(make_registry: MakeRegistry, make_adapter: MakeAdapter) -> None:
    """DoRA's column scales are computed from the base weights when the adapter is read: a registry the engine
    gave none refuses it by name (the engine always gives them)."""
    registry, _ = make_registry()
    with pytest.raises(AdapterFormatError, match="DoRA adapter needs the base model's weights"):
        registry.add("dora", make_adapter(use_dora=True))
    assert registry.records() == []


@pytest.mark.parametrize("break_it", ["corrupt", "pickled", "name"])
def test_failed_add_leaves_nothing_behind(make_registry: MakeRegistry,
                                          make_adapter: MakeAdapter, tmp_path: Path, break_it: str) -> None:
    (registry, _), source = make_registry(), make_adapter()
    registry.add("kept", make_adapter(seed=1))
    before = sorted(path.relative_to(tmp_path) for path in (tmp_path / "adapters").rglob("*"))
    name = "../escape" if break_it == "name" else "kept"
    if break_it == "corrupt":
        (source / WEIGHTS).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    if break_it == "pickled":
        (source / WEIGHTS).rename(source / "adapter_model.bin")
    with pytest.raises(AdapterNameError if break_it == "name" else AdapterFormatError):
        registry.add(name, source)
    assert sorted(path.relative_to(tmp_path) for path in (tmp_path / "adapters").rglob("*")) == before
    assert not (tmp_path / "escape").exists() and registry.record("kept").version == 1


def test_a_new_registry_finds_the_adapters(make_registry: MakeRegistry,
                                           make_adapter: MakeAdapter) -> None:
    registry, pool = make_registry()
    registry.add("a", make_adapter(seed=1, rank=2))
    registry.add("b", make_adapter(seed=2))
    source = make_adapter(seed=3)
    loaded = load_adapter(source, BASE, MAX_RANK)
    expected = loaded.weights[(1, "v_proj")][1].T * loaded.scale  # B columns, scaled, in v's output columns
    registry.add("b", source)
    registry.add("gone", make_adapter(seed=4))
    registry.remove("gone")
    restarted, pool = make_registry()
    assert [(record.name, record.version, record.rank, record.tier) for record in restarted.records()] == [
        ("a", 1, 2, "disk"), ("b", 2, 4, "disk")]
    b = restarted.resolve("b")
    slot = acquire(restarted, b)
    assert torch.equal(pool.layer_weights[1]["qkv_proj"].lora_b[pool.slot_pages[slot, :4], 64 + 32:], expected)
    restarted.release(b)
    assert restarted.add("b", make_adapter(seed=5)).version == 3


def test_pin_keeps_a_shared_version_until_every_request_unpins(make_registry: MakeRegistry,
                                                               make_adapter: MakeAdapter) -> None:
    registry, _ = make_registry()
    registry.add("tuned", make_adapter(seed=1))
    ref = registry.resolve("tuned")
    registry.pin(ref)  # a second request on the same resolve
    registry.remove("tuned")
    registry.unpin(ref)
    registry.ensure_loaded(ref)
    assert registry.num_pins() == 1
    registry.unpin(ref)
    with pytest.raises(AdapterNotFoundError):
        registry.pin(ref)


def test_requests_and_uploads_from_many_threads_leave_nothing_held(make_registry: MakeRegistry,
                                                                   make_adapter: MakeAdapter) -> None:
    registry, _ = make_registry(num_slots=2, max_cpu_loras=2)
    sources = [make_adapter(seed=seed) for seed in range(3)]
    for index, name in enumerate("abc"):
        registry.add_from_path(name, sources[index])
    failures: list[BaseException] = []

    def serve(name: str) -> None:
        try:
            for _ in range(20):
                ref = registry.resolve(name)
                registry.ensure_loaded(ref)
                while (slot := acquire(registry, ref)) is None:
                    time.sleep(0.001)
                assert 0 <= slot < 2
                registry.release(ref)
                registry.unpin(ref)
        except BaseException as error:  # re-raised below, in the test's thread
            failures.append(error)

    workers = [threading.Thread(target=serve, args=(name,)) for name in "abcab"]
    for worker in workers:
        worker.start()
    for index in range(6):
        registry.add_from_path("abc"[index % 3], sources[index % 3])
    for worker in workers:
        worker.join()
    assert failures == [] and registry.num_references() == registry.num_pins() == 0
    assert [record.version for record in registry.records()] == [3, 3, 3]


def test_activity_names_the_adapters_of_running_and_of_waiting_requests(make_registry: MakeRegistry,
                                                                         make_adapter: MakeAdapter) -> None:
    """What `lora_requests_info` reports: a held slot is running; a pin without a slot, waiting."""
    registry, _ = make_registry(num_slots=1)
    for name in ("running", "waiting"):
        registry.add(name, make_adapter())
    running, waiting = registry.resolve("running"), registry.resolve("waiting")
    assert registry.activity() == ([], ["running", "waiting"])
    assert acquire(registry, running) is not None
    assert registry.activity() == (["running"], ["waiting"])
    registry.release(running)
    for ref in (running, waiting):
        registry.unpin(ref)
    assert registry.activity() == ([], [])
