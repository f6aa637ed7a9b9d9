"""Where a registry's adapters sit: slots and pages in least-recently-used order, never evicting what a running
request holds, sparing what queued requests want; the CPU cache; reads from disk when a copy was evicted."""
import torch

from tests.adapters.helpers import EventLog, MakeAdapter, MakeRegistry, acquire, peft_q_a, slot_q_a


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
