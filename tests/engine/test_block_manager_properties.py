"""Random interleavings of admitting, growing, forking, freeing sequences and flooding the cache (which evicts)
keep the block manager's books: reference counts match the block tables, the free queue holds exactly the
unreferenced blocks, the cache maps each key to one block that holds that key's KV, and every sequence reads
back the KV it would have computed itself. The "KV" here is a record, per slot, of the adapter and of every token
up to that slot: what a real key or value depends on."""
import itertools

import torch
from hypothesis import settings, strategies
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from loraserve.adapters.records import AdapterRef
from loraserve.engine.block_manager import BlockKey, BlockManager
from loraserve.engine.sampling_params import SamplingParams
from loraserve.engine.sequence import Sequence

BLOCK_SIZE, NUM_BLOCKS = 2, 10
TOKENS = strategies.lists(strategies.integers(0, 2), min_size=1, max_size=7)  # few tokens: prefixes repeat
ADAPTERS = strategies.sampled_from([None, AdapterRef("a", 1), AdapterRef("a", 2), AdapterRef("b", 1)])
SlotContent = tuple[AdapterRef | None, tuple[int, ...]]


def last_block_key(token_ids: tuple[int, ...], adapter: AdapterRef | None) -> BlockKey:
    """The key of the last full block of `token_ids`, chained from the first as the cache chains it."""
    key = None
    for start in range(0, len(token_ids) - BLOCK_SIZE + 1, BLOCK_SIZE):
        key = BlockKey(key.digest() if key is not None else b"", token_ids[start:start + BLOCK_SIZE], adapter)
    return key


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.manager = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
        self.sequences: list[Sequence] = []
        self.slots: dict[tuple[int, int], SlotContent] = {}  # (block, offset) -> the KV written there
        self.names = (f"s{index}" for index in itertools.count())

    def compute(self, sequence: Sequence) -> None:
        """What the model does: write the KV of every uncomputed token. The invariants then check that no write
        changed what another sequence, or the cache, reads."""
        for position in range(sequence.num_computed_tokens, sequence.num_tokens):
            block = sequence.block_table[position // BLOCK_SIZE]
            self.slots[block, position % BLOCK_SIZE] = (sequence.adapter, tuple(sequence.token_ids[:position + 1]))
        sequence.num_computed_tokens = sequence.num_tokens

    def allocate_new(self, token_ids: list[int], adapter: AdapterRef | None) -> Sequence | None:
        """Admit a new sequence as the scheduler would; None when its blocks do not fit."""
        sequence = Sequence(next(self.names), token_ids, len(token_ids), SamplingParams(), torch.Generator(),
                            adapter)
        prefix = self.manager.cached_prefix(sequence)
        num_new = sequence.num_tokens - len(prefix) * BLOCK_SIZE
        if not self.manager.can_allocate(sequence, num_new, prefix):
            return None
        self.manager.allocate(sequence, num_new, prefix)
        assert sequence.num_computed_tokens == len(prefix) * BLOCK_SIZE < sequence.num_tokens
        self.sequences.append(sequence)
        return sequence

    def admit(self, token_ids: list[int], adapter: AdapterRef | None) -> Sequence | None:
        sequence = self.allocate_new(token_ids, adapter)
        if sequence is not None:
            self.compute(sequence)
        return sequence

    @rule(prompts=strategies.lists(TOKENS, min_size=1, max_size=3), adapter=ADAPTERS)
    def add(self, prompts: list[list[int]], adapter: AdapterRef | None) -> None:
        """Requests admitted in one step, which may share blocks whose KV that same step computes."""
        admitted = [self.allocate_new(token_ids, adapter) for token_ids in prompts]
        for sequence in filter(None, admitted):
            self.compute(sequence)

    @precondition(lambda self: self.sequences)
    @rule(data=strategies.data(), token_ids=TOKENS)
    def append(self, data: strategies.DataObject, token_ids: list[int]) -> None:
        """Generated tokens, computed like a decode; a sequence that no longer fits is preempted."""
        sequence = data.draw(strategies.sampled_from(self.sequences))
        sequence.token_ids.extend(token_ids)
        if self.manager.can_allocate(sequence, len(token_ids)):
            self.manager.allocate(sequence, len(token_ids))
            self.compute(sequence)
        else:
            self.free_sequence(sequence)

    @precondition(lambda self: self.sequences)
    @rule(data=strategies.data(), extra=TOKENS)
    def fork(self, data: strategies.DataObject, extra: list[int]) -> None:
        """A new request starting with a running one's tokens finds at least its keyed full blocks."""
        parent = data.draw(strategies.sampled_from(self.sequences))
        length = data.draw(strategies.integers(0, parent.num_tokens))
        keyed = list(itertools.takewhile(lambda block: self.manager.block_keys[block] is not None,
                                         parent.block_table[:length // BLOCK_SIZE]))
        child = self.admit(parent.token_ids[:length] + extra, parent.adapter)
        if child is not None:
            assert child.block_table[:len(keyed)] == keyed

    @precondition(lambda self: self.sequences)
    @rule(data=strategies.data())
    def free(self, data: strategies.DataObject) -> None:
        self.free_sequence(data.draw(strategies.sampled_from(self.sequences)))

    @precondition(lambda self: self.manager.num_free_blocks)
    @rule(adapter=ADAPTERS)
    def flood(self, adapter: AdapterRef | None) -> None:
        """One sequence of new tokens takes every free block, evicting what they cached, and leaves."""
        sequence = self.admit([7] * (self.manager.num_free_blocks * BLOCK_SIZE), adapter)
        if sequence is not None:
            assert self.manager.num_free_blocks == 0
            self.free_sequence(sequence)

    def free_sequence(self, sequence: Sequence) -> None:
        self.manager.free(sequence)
        self.sequences.remove(sequence)
        assert sequence.block_table == [] and sequence.num_computed_tokens == 0

    @invariant()
    def reference_counts_match_the_block_tables(self) -> None:
        holders = [0] * NUM_BLOCKS
        for sequence in self.sequences:
            assert len(set(sequence.block_table)) == len(sequence.block_table)
            for block in sequence.block_table:
                holders[block] += 1
        assert holders == self.manager.reference_counts
        free = [block for block in range(NUM_BLOCKS) if holders[block] == 0]
        assert sorted(self.manager.free_queue) == free

    @invariant()
    def only_cached_full_blocks_are_shared(self) -> None:
        for block, count in enumerate(self.manager.reference_counts):
            assert count <= 1 or self.manager.block_keys[block] is not None

    @invariant()
    def the_cache_maps_keys_to_blocks_holding_their_kv(self) -> None:
        assert {block: key for key, block in self.manager.cached.items()} == {
            block: key for block, key in enumerate(self.manager.block_keys) if key is not None}
        for key, block in self.manager.cached.items():
            adapter, token_ids = self.slots[block, BLOCK_SIZE - 1]
            assert adapter == key.adapter and last_block_key(token_ids, adapter) == key
            for offset in range(BLOCK_SIZE):
                assert self.slots[block, offset] == (adapter, token_ids[:len(token_ids) - BLOCK_SIZE + offset + 1])

    @invariant()
    def every_sequence_reads_its_own_kv(self) -> None:
        for sequence in self.sequences:
            for position in range(sequence.num_computed_tokens):
                block = sequence.block_table[position // BLOCK_SIZE]
                expected = (sequence.adapter, tuple(sequence.token_ids[:position + 1]))
                assert self.slots[block, position % BLOCK_SIZE] == expected


def test_block_manager_keeps_its_books():
    run_state_machine_as_test(BlockManagerMachine,
                              settings=settings(max_examples=80, stateful_step_count=30, deadline=None))
