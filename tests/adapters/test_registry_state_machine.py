"""Random interleavings of upload, remove, resolve, acquire, release and unpin keep the registry's promises: a
pinned version stays usable through uploads and removals, a held version keeps its own slot and weights,
distinct held versions never share a slot, and once everything is released, unpinned and removed, nothing is
left in memory or on disk."""
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from hypothesis import settings, strategies
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from loraserve.adapters.errors import AdapterNotFoundError
from loraserve.adapters.records import AdapterRef
from loraserve.adapters.registry import AdapterRegistry
from loraserve.adapters.slot_pool import SlotPool
from tests.adapters.helpers import BASE, acquire, read_tensors, tensor_name

NUM_SLOTS, MAX_RANK, SEEDS = 2, 8, [1, 2, 3]
NAMES = strategies.sampled_from(["a", "b", "c"])


class RegistryMachine(RuleBasedStateMachine):
    sources: dict[int, Path] = {}  # seed -> a saved adapter, set by the test

    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp())
        self.pool = SlotPool(BASE, NUM_SLOTS, NUM_SLOTS * MAX_RANK, MAX_RANK, torch.device("cpu"), torch.float32)
        self.registry = AdapterRegistry(self.directory, BASE, self.pool, max_cpu_loras=2, max_rank=MAX_RANK)
        self.seed_of: dict[AdapterRef, int] = {}
        self.current: dict[str, int] = {}  # name -> latest version
        self.pinned: list[AdapterRef] = []  # one entry per resolve, like one per request
        self.held: list[tuple[AdapterRef, int]] = []  # one entry per acquire

    @rule(name=NAMES, seed=strategies.sampled_from(SEEDS))
    def upload(self, name: str, seed: int) -> None:
        version = self.registry.add_from_path(name, self.sources[seed]).version
        assert version > self.current.get(name, 0)
        self.current[name] = version
        self.seed_of[AdapterRef(name, version)] = seed

    @rule(name=NAMES)
    def remove(self, name: str) -> None:
        try:
            self.registry.remove(name)
        except AdapterNotFoundError:
            assert name not in self.current
        else:
            del self.current[name]

    @rule(name=NAMES)
    def resolve(self, name: str) -> None:
        if name in self.current:
            ref = self.registry.resolve(name)
            assert ref.version == self.current[name]
            self.registry.ensure_loaded(ref)
            self.pinned.append(ref)

    @precondition(lambda self: self.pinned)
    @rule(data=strategies.data())
    def acquire(self, data: strategies.DataObject) -> None:
        ref = data.draw(strategies.sampled_from(self.pinned))
        slot = acquire(self.registry, ref)  # never AdapterNotFoundError: the version is pinned
        if slot is None:
            assert len({held for held, _ in self.held}) == NUM_SLOTS
        else:
            self.held.append((ref, slot))

    @precondition(lambda self: self.pinned)
    @rule(data=strategies.data())
    def unpin(self, data: strategies.DataObject) -> None:
        self.registry.unpin(self.pinned.pop(data.draw(strategies.integers(0, len(self.pinned) - 1))))

    @precondition(lambda self: self.held)
    @rule(data=strategies.data())
    def acquire_held_again(self, data: strategies.DataObject) -> None:
        ref, slot = data.draw(strategies.sampled_from(self.held))
        assert acquire(self.registry, ref) == slot  # even if replaced or removed meanwhile
        self.held.append((ref, slot))

    @precondition(lambda self: self.held)
    @rule(data=strategies.data())
    def release(self, data: strategies.DataObject) -> None:
        ref, _ = self.held.pop(data.draw(strategies.integers(0, len(self.held) - 1)))
        self.registry.release(ref)

    @invariant()
    def held_versions_keep_their_own_slots(self) -> None:
        slots: dict[AdapterRef, int] = {}
        for ref, slot in self.held:
            assert slots.setdefault(ref, slot) == slot
        assert len(set(slots.values())) == len(slots) <= NUM_SLOTS
        for ref, slot in slots.items():
            expected = read_tensors(self.sources[self.seed_of[ref]])[tensor_name(0, "q_proj", "A")]
            pages = self.pool.slot_pages[slot, :4]
            assert torch.equal(self.pool.layer_weights[0]["qkv_proj"].lora_a[pages, 0], expected)
        assert self.registry.num_references() == len(self.held)
        assert self.registry.num_pins() == len(self.pinned)
        assert self.registry.slots_in_use() <= NUM_SLOTS
        assert [record.name for record in self.registry.records()] == sorted(self.current)

    def teardown(self) -> None:
        for ref, _ in self.held:
            self.registry.release(ref)
        for ref in self.pinned:
            self.registry.unpin(ref)
        for name in self.current:
            self.registry.remove(name)
        assert self.registry.num_references() == self.registry.num_pins() == self.registry.slots_in_use() == 0
        assert list(self.directory.iterdir()) == []
        shutil.rmtree(self.directory)


def test_registry_invariants_hold_under_random_operations(saved_adapter: Callable[..., Path]) -> None:
    RegistryMachine.sources = {seed: saved_adapter(seed=seed) for seed in SEEDS}
    run_state_machine_as_test(RegistryMachine, settings=settings(max_examples=30, stateful_step_count=20,
                                                                  deadline=None, database=None))
