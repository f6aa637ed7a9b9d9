import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from loraserve.adapters.errors import AdapterFormatError, AdapterNameError, AdapterNotFoundError
from loraserve.adapters.format import load_adapter
from loraserve.adapters.registry import AdapterRef, AdapterRegistry
from loraserve.adapters.slot_pool import SlotPool
from tests.adapters.helpers import BASE, WEIGHTS, acquire, read_tensors, tensor_name

MAX_RANK = 8
MakeRegistry = Callable[..., tuple[AdapterRegistry, SlotPool]]
MakeAdapter = Callable[..., Path]


class EventLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def adapter_loaded(self, tier: str, seconds: float) -> None:
        assert seconds >= 0
        self.events.append(("loaded", tier))

    def adapter_evicted(self, tier: str) -> None:
        self.events.append(("evicted", tier))


@pytest.fixture
def make_registry(tmp_path: Path) -> MakeRegistry:
    """A registry over tmp_path/adapters, and its slot pool to look into."""
    def make(num_slots: int = 2, max_cpu_loras: int = 4, listener: EventLog | None = None,
             num_pages: int | None = None) -> tuple[AdapterRegistry, SlotPool]:
        pool = SlotPool(BASE, num_slots, num_pages or num_slots * MAX_RANK, MAX_RANK, torch.device("cpu"),
                        torch.float32)
        return AdapterRegistry(tmp_path / "adapters", BASE, pool, max_cpu_loras, MAX_RANK, listener), pool
    return make


def slot_q_a(pool: SlotPool, slot: int) -> torch.Tensor:
    """Layer 0's q_proj A as written in the slot's pages (rank 4 rows); zero once the slot is freed."""
    return pool.layer_weights[0]["qkv_proj"].lora_a[pool.slot_pages[slot, :4], 0]


def peft_q_a(directory: Path) -> torch.Tensor:
    return read_tensors(directory)[tensor_name(0, "q_proj", "A")]


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


def test_slots_are_lru_and_referenced_slots_are_never_evicted(make_registry: MakeRegistry,
                                                              make_adapter: MakeAdapter) -> None:
    events = EventLog()
    registry, pool = make_registry(num_slots=2, listener=events)
    refs = {}
    for seed, name in enumerate("abc"):
        registry.add(name, make_adapter(seed=seed))
        refs[name] = registry.resolve(name)
    slot_a, slot_b = acquire(registry, refs["a"]), acquire(registry, refs["b"])
    assert acquire(registry, refs["c"]) is None  # both slots held
    registry.release(refs["a"])
    assert acquire(registry, refs["c"]) == slot_a and ("evicted", "gpu") in events.events
    assert [registry.record(name).tier for name in "abc"] == ["cpu", "gpu", "gpu"]
    registry.release(refs["b"])
    registry.release(refs["c"])
    assert acquire(registry, refs["a"]) == slot_b  # b was used less recently than c
    assert [registry.record(name).tier for name in "abc"] == ["gpu", "cpu", "gpu"]
    registry.release(refs["a"])
    assert registry.num_references() == 0 and registry.slots_in_use() == 2


def test_a_slot_nobody_waits_for_is_reused_before_a_less_recent_one_that_queued_requests_want(
        make_registry: MakeRegistry, make_adapter: MakeAdapter) -> None:
    registry, pool = make_registry(num_slots=2)
    refs = {}
    for seed, name in enumerate("abc"):
        registry.add(name, make_adapter(seed=seed))
        refs[name] = registry.resolve(name)
    acquire(registry, refs["a"])
    slot_b = acquire(registry, refs["b"])
    registry.release(refs["a"])  # a's request is preempted: still queued, still pinned
    registry.release(refs["b"])
    registry.unpin(refs["b"])  # b's request is over; b is the more recently used
    assert acquire(registry, refs["c"]) == slot_b
    assert [registry.record(name).tier for name in "abc"] == ["gpu", "cpu", "gpu"]
    registry.release(refs["c"])
    for name in "ac":
        registry.unpin(refs[name])


def test_only_the_oldest_want_takes_a_slot_another_queued_request_wants(make_registry: MakeRegistry,
                                                                        make_adapter: MakeAdapter) -> None:
    """Loads start as requests arrive: a later want placed by evicting an adapter loaded for a request ahead of
    it would undo that load before the request could run. The oldest want may (else it could wait forever)."""
    registry, _ = make_registry(num_slots=2)
    refs = {}
    for seed, name in enumerate("abc"):
        registry.add(name, make_adapter(seed=seed))
        refs[name] = registry.resolve(name)  # three queued requests
    assert registry.make_resident(refs["a"]) and registry.make_resident(refs["b"])
    assert not registry.make_resident(refs["c"], evict_wanted=False)
    assert [registry.record(name).tier for name in "abc"] == ["gpu", "gpu", "cpu"]
    assert registry.make_resident(refs["c"], evict_wanted=True)
    assert [registry.record(name).tier for name in "abc"] == ["cpu", "gpu", "gpu"]
    for name in "abc":
        registry.unpin(refs[name])


def test_a_dora_adapter_needs_the_base_weights(make_registry: MakeRegistry, make_adapter: MakeAdapter) -> None:
    """DoRA's column scales are computed from the base weights when the adapter is read: a registry the engine
    gave none refuses it by name (the engine always gives them)."""
    registry, _ = make_registry()
    with pytest.raises(AdapterFormatError, match="DoRA adapter needs the base model's weights"):
        registry.add("dora", make_adapter(use_dora=True))
    assert registry.records() == []


def test_pages_bound_what_is_resident_whatever_the_ranks(make_registry: MakeRegistry,
                                                        make_adapter: MakeAdapter) -> None:
    """Ten pages, four slots: a rank-8 and a rank-2 adapter fill them; a rank-4 one evicts what it must."""
    registry, pool = make_registry(num_slots=4, num_pages=10)
    refs = {}
    for name, rank in [("large", 8), ("small", 2), ("middle", 4)]:
        registry.add(name, make_adapter(rank=rank, alpha=rank))
        refs[name] = registry.resolve(name)
    acquire(registry, refs["large"]), acquire(registry, refs["small"])
    assert pool.num_free_pages == 0 and acquire(registry, refs["middle"]) is None  # both held
    registry.release(refs["small"])
    assert acquire(registry, refs["middle"]) is None  # two pages free up: not enough
    registry.release(refs["large"])
    assert acquire(registry, refs["middle"]) is not None and pool.num_free_pages == 4  # the LRU one sufficed
    assert [registry.record(name).tier for name in ("large", "small", "middle")] == ["cpu", "gpu", "gpu"]
    registry.release(refs["middle"])
    for ref in refs.values():
        registry.unpin(ref)


def test_cpu_cache_is_lru_and_spares_referenced_adapters(make_registry: MakeRegistry,
                                                         make_adapter: MakeAdapter) -> None:
    events = EventLog()
    registry, pool = make_registry(num_slots=1, max_cpu_loras=2, listener=events)
    for seed, name in enumerate("abc"):
        registry.add(name, make_adapter(seed=seed))  # uploads are cached: c's pushes a out
    tiers = lambda: [registry.record(name).tier for name in "abc"]  # noqa: E731
    assert tiers() == ["disk", "cpu", "cpu"] and events.events.count(("evicted", "cpu")) == 1
    a, b, c = (registry.resolve(name) for name in "abc")
    registry.ensure_loaded(a)
    assert tiers() == ["cpu", "disk", "cpu"]  # b was the least recently used
    acquire(registry, a)
    registry.ensure_loaded(b)  # a is the least recently used, but referenced: c goes
    assert tiers() == ["gpu", "cpu", "disk"]
    registry.release(a)
    acquire(registry, b)  # takes a's slot; a's CPU copy is still there
    assert tiers() == ["cpu", "gpu", "disk"] and events.events.count(("evicted", "cpu")) == 3
    registry.release(b)


def test_acquire_reads_disk_when_the_cpu_copy_was_evicted(make_registry: MakeRegistry,
                                                          make_adapter: MakeAdapter) -> None:
    events = EventLog()
    registry, pool = make_registry(max_cpu_loras=1, listener=events)
    source = make_adapter(seed=1)
    expected = peft_q_a(source)
    registry.add("a", source)
    registry.add("b", make_adapter(seed=2))
    events.events.clear()
    slot = acquire(registry, registry.resolve("a"))
    assert events.events == [("evicted", "cpu"), ("loaded", "cpu"), ("loaded", "gpu")]
    assert torch.equal(slot_q_a(pool, slot), expected)


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
