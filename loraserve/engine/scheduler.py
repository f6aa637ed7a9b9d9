"""Decides which requests run in the next step, and how many of their tokens, within a token budget.

Running requests go first, oldest first, each taking a decode token (and its draft tokens, when speculating) or
the rest of its prefill (chunked to fit the budget); waiting requests are admitted in arrival order with what
budget is left, skipping the leading blocks the prefix cache already holds. When the cache runs out of blocks,
the newest running request is preempted: its blocks are freed and it is recomputed later. A request with an
adapter is admitted only once its adapter is resident in a slot, so a step never has more distinct adapters than
there are slots; requests that can run go ahead of it meanwhile, for at most `max_overtaking_steps` steps.
"""
import time
from collections import deque
from dataclasses import dataclass

from loraserve.adapters.errors import AdapterError
from loraserve.adapters.registry import AdapterRegistry
from loraserve.engine.block_manager import BlockManager
from loraserve.engine.sequence import Sequence, SequenceStatus


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

    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int, max_num_seqs: int,
                 adapters: AdapterRegistry | None = None, max_overtaking_steps: int = 64) -> None:
        self.block_manager = block_manager
        self.adapters = adapters
        self.max_overtaking_steps = max_overtaking_steps
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.failed: list[tuple[Sequence, Exception]] = []  # ended while being admitted, not yet reported

    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, prefill_limit: int | None = None) -> ScheduledBatch:
        """The next step's batch. `prefill_limit` caps the prompt tokens it computes (chunks of running requests
        and admissions), not the decodes: a step kept short returns sooner to a caller that wants to change how
        the next one runs."""
        batch = ScheduledBatch([], [])
        budget = self.max_num_batched_tokens
        prefill_budget = budget if prefill_limit is None else prefill_limit
        index = 0
        while index < len(self.running) and budget > 0:
            sequence = self.running[index]
            prefilling = sequence.num_tokens - sequence.num_computed_tokens > 1
            num_new = self._fit_drafts(sequence, min(budget, prefill_budget) if prefilling else budget)
            index += 1
            if num_new == 0:
                continue  # a prompt chunk past the prefill limit waits for the next step
            if not self._make_room(sequence, num_new, batch):
                break  # `sequence` itself was preempted: everyone after it is gone too
            self.block_manager.allocate(sequence, num_new)
            batch.sequences.append(sequence)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
            prefill_budget -= num_new if prefilling else 0
        if batch.num_preempted == 0:
            self._admit_waiting(batch, min(budget, prefill_budget))
        return batch

    def _fit_drafts(self, sequence: Sequence, budget: int) -> int:
        """Tokens `sequence` computes this step: drafts past the budget are dropped, and all of them when the
        cache cannot hold them, since guesses are not worth preempting another request for."""
        num_new = min(sequence.num_uncomputed_tokens, budget)
        sequence.truncate_drafts(max(0, sequence.num_computed_tokens + num_new - sequence.num_tokens))
        if sequence.draft_token_ids and not self.block_manager.can_allocate(sequence, num_new):
            sequence.truncate_drafts()
            num_new = sequence.num_uncomputed_tokens
        return num_new

    def _make_room(self, sequence: Sequence, num_new: int, batch: ScheduledBatch) -> bool:
        """Preempt the newest running requests until `sequence` fits; False if `sequence` itself had to go."""
        while not self.block_manager.can_allocate(sequence, num_new):
            victim = self.running[-1]
            self.preempt(victim)
            batch.num_preempted += 1
            if victim is sequence:
                return False
        return True

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        """Admit in arrival order while blocks, budget and --max-num-seqs allow. A request whose adapter is not in
        a slot yet is passed over, so base requests and those of resident adapters behind it run meanwhile; once a
        request has been passed over in `max_overtaking_steps` steps, nobody passes it any more."""
        passed_over: list[Sequence] = []
        overtaken: set[int] = set()  # id() of those passed over and then overtaken this step
        index = 0
        while index < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            sequence = self.waiting[index]
            prefix = self.block_manager.cached_prefix(sequence)
            num_given = self._num_given(sequence, prefix)
            num_new = min(sequence.num_tokens - len(prefix) * self.block_manager.block_size - num_given, budget)
            if not self.block_manager.can_allocate(sequence, num_given + num_new, prefix):
                break  # memory is first come, first served: nobody overtakes a request that does not fit
            try:
                held = self._hold_adapter(sequence)
            except AdapterError as error:  # its adapter cannot be loaded: this request alone fails
                self.finish(sequence, "error")
                self.failed.append((sequence, error))
                continue
            if not held:
                if sequence.overtaken_steps >= self.max_overtaking_steps:
                    break
                passed_over.append(sequence)
                index += 1
                continue
            overtaken.update(id(waiting) for waiting in passed_over)
            del self.waiting[index]
            self._admit(sequence, num_new, prefix, batch, num_given)
            budget -= num_new
        for sequence in passed_over:
            sequence.overtaken_steps += id(sequence) in overtaken

    def _num_given(self, sequence: Sequence, prefix: tuple[int, ...]) -> int:
        """Virtual tokens past the cached prefix whose KV the adapter gives (prefix tuning): written, not computed,
        so they take blocks but no budget."""
        if not sequence.virtual_kv_given:
            return 0
        return max(0, sequence.num_virtual_tokens - len(prefix) * self.block_manager.block_size)

    def _admit(self, sequence: Sequence, num_new: int, prefix: tuple[int, ...], batch: ScheduledBatch,
               num_given: int) -> None:
        self.block_manager.allocate(sequence, num_given + num_new, prefix)
        cached = sequence.num_computed_tokens
        sequence.pending_virtual_kv = (cached, cached + num_given) if num_given else None
        sequence.num_computed_tokens += num_given
        sequence.status = SequenceStatus.RUNNING
        if sequence.first_scheduled_time is None:
            sequence.first_scheduled_time = time.monotonic()
            sequence.num_cached_tokens = max(0, cached - sequence.num_virtual_tokens)  # of the prompt's own
        self.running.append(sequence)
        batch.sequences.append(sequence)
        batch.num_new_tokens.append(num_new)

    def take_failed(self) -> list[tuple[Sequence, Exception]]:
        """Requests that failed to be admitted since the last call (already finished), with their errors."""
        failed, self.failed = self.failed, []
        return failed

    def preempt(self, sequence: Sequence) -> None:
        """Free `sequence`'s blocks and put it first in line; its KV will be recomputed from its tokens."""
        self.running.remove(sequence)
        self.block_manager.free(sequence)
        self._release_adapter(sequence)
        sequence.truncate_drafts()
        sequence.status = SequenceStatus.WAITING
        self.waiting.appendleft(sequence)

    def finish(self, sequence: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        """Retire `sequence` (finished or aborted) and return its blocks at once."""
        if sequence.status is SequenceStatus.RUNNING:
            self.running.remove(sequence)
        elif sequence.status is SequenceStatus.WAITING:
            self.waiting.remove(sequence)
        self.block_manager.free(sequence)
        self._release_adapter(sequence)
        if sequence.adapter is not None:
            self.adapters.unpin(sequence.adapter)  # the pin the request was added with
        sequence.status = SequenceStatus.FINISHED
        sequence.finish_reason = reason
        sequence.stop_reason = stop_reason

    def _hold_adapter(self, sequence: Sequence) -> bool:
        """Give `sequence` its adapter's slot; False while the adapter is not resident (the registry's loader
        brings it in meanwhile, off this thread)."""
        if sequence.adapter is None or sequence.adapter_slot >= 0:
            return True
        assert self.adapters is not None
        slot = self.adapters.hold(sequence.adapter)
        if slot is None:
            return False
        sequence.adapter_slot = slot
        return True

    def _release_adapter(self, sequence: Sequence) -> None:
        if sequence.adapter_slot >= 0:
            self.adapters.release(sequence.adapter)
            sequence.adapter_slot = -1
