"""Speculative decoding's proposers: cheap guesses at a sequence's next tokens, which the target model then
verifies all at once in the step that would otherwise compute one token.

A proposer sets `draft_token_ids` (and, if it sampled them, `draft_probabilities`) on the sequences it is given.
"""
from typing import Protocol

import torch

from server.engine.sequence import Sequence


class Proposer(Protocol):
    def propose(self, sequences: list[Sequence], limits: list[int]) -> None:
        """Give each sequence up to its limit of draft tokens (or none), after its verified tokens."""

    def release(self, request_id: str) -> None:
        """Forget a finished request and free whatever was kept for it."""


class NgramProposer:
    """Prompt lookup: find an earlier occurrence of the sequence's last n tokens (longest n first, from `max_n`
    down to `min_n`) in its prompt and output, and propose the tokens that followed it. Free to run, and right
    often when the output copies its input: edits, extraction, code, quoting."""

    def __init__(self, min_n: int, max_n: int) -> None:
        assert 1 <= min_n <= max_n
        self.min_n, self.max_n = min_n, max_n

    def propose(self, sequences: list[Sequence], limits: list[int]) -> None:
        for sequence, limit in zip(sequences, limits):
            sequence.draft_token_ids = self.lookup(sequence.token_ids, limit)
            sequence.draft_probabilities = None  # a lookup is deterministic: a point mass on each draft

    def lookup(self, token_ids: list[int], limit: int) -> list[int]:
        """Up to `limit` tokens that followed the longest matching suffix's latest earlier occurrence that is
        followed by `limit` tokens (the latest at all if none is: in a loop, the latest match is the nearest)."""
        if len(token_ids) < self.min_n + 1:
            return []
        tokens = torch.tensor(token_ids)
        for n in range(min(self.max_n, len(token_ids) - 1), self.min_n - 1, -1):
            # Windows starting at 0 .. len - n - 1: every n-gram before the suffix itself.
            windows = tokens[:-1].unfold(0, n, 1)
            matches = (windows == tokens[-n:]).all(dim=1).nonzero().flatten()
            if len(matches):
                whole = matches[matches <= len(token_ids) - n - limit]
                start = int(whole[-1] if len(whole) else matches[-1]) + n
                return token_ids[start:start + limit]
        return []

    def release(self, request_id: str) -> None:
        """Nothing is kept per request."""
