"""Speculative decoding's part of each step, around the proposer: before the step, drafts for the running requests
that are decoding (within each one's max_tokens; a request the proposer fails on is served on without
speculation), cut down to those worth verifying when a draft budget decides (draft_budget.py); after it, the hidden
states a proposer guesses from, and what the step showed of the drafts; when a request ends, what was kept."""
import dataclasses
import logging
import time

import torch

from loraserve.engine.draft_budget import DraftBudget
from loraserve.engine.fault_isolation import GeneratorSnapshot, isolate
from loraserve.engine.proposers import Proposer
from loraserve.engine.sampler import Sampled
from loraserve.engine.sequence import Sequence

logger = logging.getLogger(__name__)


class Speculation:
    def __init__(self, proposer: Proposer, num_tokens: int, adaptive: bool) -> None:
        self.proposer = proposer
        self.num_tokens = num_tokens  # drafts per request and step, at most
        self.budget = DraftBudget(num_tokens) if adaptive else None  # None: every draft is verified

    def propose(self, running: list[Sequence]) -> int:
        """Draft tokens for every running request that is decoding and allows it; returns how many tokens were
        proposed but are not to be verified."""
        decoding, limits = [], []
        for sequence in running:
            sequence.truncate_drafts()
            limit = min(self.num_tokens, sequence.params.max_tokens - sequence.num_output_tokens - 1)
            if sequence.params.speculative and limit > 0 and sequence.num_uncomputed_tokens == 1:
                decoding.append(sequence)
                limits.append(limit)
        if not decoding:
            return 0
        if self.budget is not None:
            limits = self.budget.limits(decoding, limits)
        work = [(sequence, limit) for sequence, limit in zip(decoding, limits) if limit > 0]
        snapshot = GeneratorSnapshot([sequence for sequence, _ in work if not sequence.params.greedy])

        def undo(group: list[tuple[Sequence, int]]) -> None:
            snapshot.restore(sequence for sequence, _ in group)
            for sequence, _ in group:
                sequence.truncate_drafts()
                self.proposer.release(sequence.request_id)  # its shadow may be half advanced

        def stop_speculating(item: tuple[Sequence, int], error: Exception) -> None:
            logger.error("proposing drafts failed for request %s; it goes on without speculation",
                         item[0].request_id, exc_info=error)
            item[0].params = dataclasses.replace(item[0].params, speculative=False)

        started = time.perf_counter()
        isolate(work, lambda group: self.proposer.propose([s for s, _ in group], [k for _, k in group]), undo,
                stop_speculating)
        if self.budget is None:
            return 0
        guesses = sum(len(sequence.draft_token_ids) for sequence, _ in work)
        if guesses:
            self.budget.record_proposal(guesses, time.perf_counter() - started)
        return self.budget.choose([sequence for sequence, _ in work])

    def after_sampling(self, sequences: list[Sequence], results: list[Sampled], hidden: torch.Tensor) -> None:
        """Learn from the step how often drafts hold, and keep, for the sequences the proposer guesses from hidden
        states, the row its last new token was sampled from (a view of the step's rows, not a copy). Called before
        the tokens are appended: rows follow drafts."""
        if self.budget is not None:
            self.budget.observe(sequences, results)
        start = 0
        for sequence, result in zip(sequences, results):
            if self.proposer.wants_hidden_state(sequence):
                sequence.hidden_state = hidden[start + result.num_accepted]
                sequence.hidden_state_length = sequence.num_tokens + len(result.token_ids)
            start += result.num_drafts + 1

    def record_step(self, rows: int, seconds: float) -> None:
        """The time of a step in which every request computed its next token (and drafts), no prompt chunks."""
        if self.budget is not None:
            self.budget.record_step(rows, seconds)

    def release(self, request_id: str) -> None:
        """Forget an ended request (a request preempted while speculating has a draft model's shadow)."""
        self.proposer.release(request_id)
        if self.budget is not None:
            self.budget.release(request_id)
