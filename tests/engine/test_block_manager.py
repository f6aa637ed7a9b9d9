import torch

from server.engine.block_manager import BlockManager
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import Sequence


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
    assert shared not in manager.free_blocks
    manager.free(sharer)
    assert shared in manager.free_blocks and manager.num_free_blocks == 4
