import torch

from loraserve.adapters.records import AdapterRef
from loraserve.engine.block_manager import BlockManager
from loraserve.engine.sampling_params import SamplingParams
from loraserve.engine.sequence import Sequence


def make_sequence(num_tokens: int, request_id: str = "r") -> Sequence:
    return Sequence(request_id, list(range(num_tokens)), num_tokens, SamplingParams(), torch.Generator())


def test_allocation_covers_exactly_the_tokens_asked_for():
    manager = BlockManager(num_blocks=8, block_size=4)
    sequence = make_sequence(9)
    assert manager.blocks_needed(sequence, 9) == 3
    manager.allocate(sequence, 9)
    assert len(sequence.block_table) == 3 and manager.num_free_blocks == 5
    sequence.num_computed_tokens = 9
    assert manager.blocks_needed(sequence, 3) == 0  # the third block still has room for 3 tokens
    assert manager.blocks_needed(sequence, 4) == 1


def test_blocks_are_distinct_and_free_returns_them_all():
    manager = BlockManager(num_blocks=6, block_size=2)
    first, second = make_sequence(5, "a"), make_sequence(6, "b")
    manager.allocate(first, 5)
    manager.allocate(second, 6)
    assert set(first.block_table).isdisjoint(second.block_table)
    assert manager.num_free_blocks == 0 and not manager.can_allocate(make_sequence(1), 1)
    manager.free(first)
    manager.free(second)
    assert manager.num_free_blocks == 6 and manager.usage == 0.0
    assert first.block_table == [] and all(count == 0 for count in manager.reference_counts)


def test_a_shared_block_stays_held_until_its_last_holder_frees_it():
    manager = BlockManager(num_blocks=4, block_size=2)
    owner, sharer = make_sequence(2, "a"), make_sequence(2, "b")
    manager.allocate(owner, 2)
    shared = owner.block_table[0]
    manager.reference_counts[shared] += 1
    sharer.block_table = [shared]
    manager.free(owner)
    assert shared not in manager.free_queue
    manager.free(sharer)
    assert shared in manager.free_queue and manager.num_free_blocks == 4


def admit(manager: BlockManager, sequence: Sequence) -> int:
    """Admit `sequence` as the scheduler would, for its whole prompt, and pretend the model ran; returns how many
    of its tokens came from the cache."""
    prefix = manager.cached_prefix(sequence)
    num_new = sequence.num_tokens - len(prefix) * manager.block_size
    manager.allocate(sequence, num_new, prefix)
    cached = sequence.num_computed_tokens
    sequence.num_computed_tokens += num_new
    return cached


def test_a_shared_prompt_reuses_full_blocks_but_never_the_last_token():
    manager = BlockManager(num_blocks=16, block_size=4)
    first = make_sequence(10, "a")  # blocks [0-3] [4-7] [8-9]
    assert admit(manager, first) == 0 and manager.num_cached_blocks == 2
    longer = make_sequence(14, "b")
    assert admit(manager, longer) == 8 and longer.block_table[:2] == first.block_table[:2]
    assert manager.reference_counts[first.block_table[0]] == 2
    exact = make_sequence(8, "c")  # the whole prompt is cached: its last block is computed again, privately
    assert admit(manager, exact) == 4 and exact.block_table[1] not in first.block_table
    assert exact.block_digests == first.block_digests
    for sequence in (first, longer, exact):
        manager.free(sequence)
    assert manager.num_free_blocks == 16 and manager.num_cached_blocks == 3  # [0-3] [4-7] [8-11]


def test_unheld_cached_blocks_are_evicted_least_recently_used_first():
    manager = BlockManager(num_blocks=4, block_size=2)
    old, new = make_sequence(3, "old"), Sequence("new", [9, 9, 9], 3, SamplingParams(), torch.Generator())
    admit(manager, old)
    admit(manager, new)
    manager.free(new)
    manager.free(old)  # its unkeyed last block goes ahead of new's cached one
    assert manager.num_cached_blocks == 2 and manager.num_free_blocks == 4
    revived = make_sequence(3, "revived")  # takes old's cached block out of the middle of the free queue
    assert admit(manager, revived) == 2 and manager.num_free_blocks == 2
    admit(manager, Sequence("filler", [5, 5], 2, SamplingParams(), torch.Generator()))  # the unkeyed block
    assert manager.cached_prefix(new) != ()
    admit(manager, Sequence("filler", [6, 6], 2, SamplingParams(), torch.Generator()))  # new's cached block
    assert manager.cached_prefix(new) == () and manager.num_free_blocks == 0
    assert manager.cached_prefix(make_sequence(3)) == tuple(revived.block_table[:1])


def test_another_adapter_or_version_never_shares_blocks():
    manager = BlockManager(num_blocks=16, block_size=4)
    for adapter in (None, AdapterRef("a", 1), AdapterRef("b", 1), AdapterRef("a", 2)):
        sequence = make_sequence(9, str(adapter))
        sequence.adapter = adapter
        assert admit(manager, sequence) == 0
    assert manager.num_cached_blocks == 8
