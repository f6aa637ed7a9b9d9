"""Speculative decoding's part of each step, around the proposer: before the step, drafts for the running requests
that are decoding (within each one's max_tokens; a request the proposer fails on is served on without
speculation); after it, the hidden states a proposer guesses from; when a request ends, what the proposer kept."""
import dataclasses
import logging

import torch

from loraserve.engine.fault_isolation import GeneratorSnapshot, isolate
from loraserve.engine.proposers import Proposer
from loraserve.engine.sampler import Sampled
from loraserve.engine.sequence import Sequence

logger = logging.getLogger(__name__)


class Speculation:
    def __init__(self, proposer: Proposer, num_tokens: int) -> None:
        self.proposer = proposer
        self.num_tokens = num_tokens  # drafts per request and step, at most

    def propose(self, running: list[Sequence]) -> None:
        """Draft tokens for every running request that is decoding and allows it."""
        work = []
        for sequence in running:
            sequence.truncate_drafts()
            limit = min(self.num_tokens, sequence.params.max_tokens - sequence.num_output_tokens - 1)
            if sequence.params.speculative and limit > 0 and sequence.num_uncomputed_tokens == 1:
                work.append((sequence, limit))
        if not work:
            return
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

        isolate(work, lambda group: self.proposer.propose([s for s, _ in group], [k for _, k in group]), undo,
                stop_speculating)

    def keep_hidden_states(self, sequences: list[Sequence], results: list[Sampled], hidden: torch.Tensor) -> None:
        """Keep, for the sequences the proposer guesses from hidden states, the row its last new token was sampled
        from (a view of the step's rows, not a copy). Called before the tokens are appended: rows follow drafts."""
        start = 0
        for sequence, result in zip(sequences, results):
            if self.proposer.wants_hidden_state(sequence):
                sequence.hidden_state = hidden[start + result.num_accepted]
                sequence.hidden_state_length = sequence.num_tokens + len(result.token_ids)
            start += result.num_drafts + 1

    def release(self, request_id: str) -> None:
        """Forget an ended request (a request preempted while speculating has a draft model's shadow)."""
        self.proposer.release(request_id)
