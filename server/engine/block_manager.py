"""The paged KV cache's bookkeeping: which blocks are free, who holds which, how many hold each."""
from collections import deque

from server.engine.sequence import Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    """How many blocks `num_tokens` tokens fill (the last one may be partial)."""
    return (num_tokens + block_size - 1) // block_size


class BlockManager:
    """Hands out fixed-size KV blocks from a free list and takes them back when their last holder lets go."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.reference_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by some sequence."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, sequence: Sequence, num_new_tokens: int) -> int:
        """Extra blocks `sequence` needs to hold the KV of its next `num_new_tokens` tokens."""
        total = blocks_for(sequence.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, total - len(sequence.block_table))

    def can_allocate(self, sequence: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(sequence, num_new_tokens) <= self.num_free_blocks

    def allocate(self, sequence: Sequence, num_new_tokens: int) -> None:
        """Grow `sequence`'s block table to cover its next `num_new_tokens` tokens."""
        needed = self.blocks_needed(sequence, num_new_tokens)
        assert needed <= self.num_free_blocks, "allocate called without can_allocate"
        for _ in range(needed):
            block = self.free_blocks.popleft()
            assert self.reference_counts[block] == 0
            self.reference_counts[block] = 1
            sequence.block_table.append(block)

    def free(self, sequence: Sequence) -> None:
        """Release every block of `sequence`; a block returns to the free list when nobody else holds it."""
        for block in reversed(sequence.block_table):
            self.reference_counts[block] -= 1
            assert self.reference_counts[block] >= 0
            if self.reference_counts[block] == 0:
                self.free_blocks.append(block)
        sequence.block_table = []
        sequence.num_computed_tokens = 0
