"""Decides which requests run in the next step, and how many of their tokens, within a token budget.

Running requests go first, oldest first, each taking a decode token or the rest of its prefill (chunked to fit
the budget); waiting requests are admitted in arrival order with what budget is left. When the cache runs out of
blocks, the newest running request is preempted: its blocks are freed and it is recomputed later.
"""
import time
from collections import deque
from dataclasses import dataclass

from server.engine.block_manager import BlockManager
from server.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """The requests of one step and how many new tokens each computes, in batch order."""

    sequences: list[Sequence]
    num_new_tokens: list[int]
    num_preempted: int = 0

    @property
    def empty(self) -> bool:
        return not self.sequences


class Scheduler:
    """Owns the waiting queue and the running batch, and the block manager they draw on."""

    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        self.block_manager = block_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch([], [])
        budget = self.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            sequence = self.running[index]
            num_new = min(sequence.num_uncomputed_tokens, budget)
            if not self._make_room(sequence, num_new, batch):
                break  # `sequence` itself was preempted: everyone after it is gone too
            self.block_manager.allocate(sequence, num_new)
            batch.sequences.append(sequence)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
            index += 1
        if batch.num_preempted == 0:
            self._admit_waiting(batch, budget)
        return batch

    def _make_room(self, sequence: Sequence, num_new: int, batch: ScheduledBatch) -> bool:
        """Preempt the newest running requests until `sequence` fits; False if `sequence` itself had to go."""
        while not self.block_manager.can_allocate(sequence, num_new):
            victim = self.running[-1]
            self._preempt(victim)
            batch.num_preempted += 1
            if victim is sequence:
                return False
        return True

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            sequence = self.waiting[0]
            num_new = min(sequence.num_uncomputed_tokens, budget)
            if not self.block_manager.can_allocate(sequence, num_new):
                break  # first come, first served: nobody overtakes the oldest waiting request
            self.waiting.popleft()
            self.block_manager.allocate(sequence, num_new)
            sequence.status = SequenceStatus.RUNNING
            if sequence.first_scheduled_time is None:
                sequence.first_scheduled_time = time.monotonic()
            self.running.append(sequence)
            batch.sequences.append(sequence)
            batch.num_new_tokens.append(num_new)
            budget -= num_new

    def _preempt(self, sequence: Sequence) -> None:
        """Free `sequence`'s blocks and put it first in line; its KV will be recomputed from its tokens."""
        self.running.remove(sequence)
        self.block_manager.free(sequence)
        sequence.status = SequenceStatus.WAITING
        self.waiting.appendleft(sequence)

    def finish(self, sequence: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        """Retire `sequence` (finished or aborted) and return its blocks at once."""
        if sequence.status is SequenceStatus.RUNNING:
            self.running.remove(sequence)
        elif sequence.status is SequenceStatus.WAITING:
            self.waiting.remove(sequence)
        self.block_manager.free(sequence)
        sequence.status = SequenceStatus.FINISHED
        sequence.finish_reason = reason
        sequence.stop_reason = stop_reason
