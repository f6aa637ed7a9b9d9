"""Speculative decoding's proposers: cheap guesses at a sequence's next tokens, which the target model then
verifies all at once in the step that would otherwise compute one token.

A proposer sets `draft_token_ids` (and, if it sampled them, `draft_probabilities`) on the sequences it is given.
One that guesses from the target's hidden states says which sequences it wants them for; the engine keeps each such
sequence's last one (`Sequence.hidden_state`) from the step that sampled its last token.
"""
from typing import Protocol

import numpy as np

from loraserve.engine.sequence import Sequence


class Proposer(Protocol):
    def propose(self, sequences: list[Sequence], limits: list[int]) -> None:
        """Give each sequence up to its limit of draft tokens (or none), after its verified tokens."""

    def release(self, request_id: str) -> None:
        """Forget a finished request and free whatever was kept for it."""

    def wants_hidden_state(self, sequence: Sequence) -> bool:
        """Whether it guesses this sequence's drafts from the target's last hidden state."""


class TokenHistory:
    """One request's tokens as a numpy array that grows by doubling, so each lookup reads them without
    converting the whole list again."""

    def __init__(self) -> None:
        self.array = np.empty(256, dtype=np.int64)
        self.length = 0

    def sync(self, token_ids: list[int]) -> np.ndarray:
        """Append the tokens added since the last call (verified tokens are only ever appended)."""
        assert len(token_ids) >= self.length
        if len(token_ids) > len(self.array):
            grown = np.empty(max(len(token_ids), 2 * len(self.array)), dtype=np.int64)
            grown[:self.length] = self.array[:self.length]
            self.array = grown
        self.array[self.length:len(token_ids)] = token_ids[self.length:]
        self.length = len(token_ids)
        return self.array[:self.length]


class NgramProposer:
    """Prompt lookup: find an earlier occurrence of the sequence's last n tokens (longest n first, from `max_n`
    down to `min_n`) in its prompt and output, and propose the tokens that followed it. Nearly free to run, and
    right often when the output copies its input: edits, extraction, code, quoting."""

    def __init__(self, min_n: int, max_n: int) -> None:
        assert 1 <= min_n <= max_n
        self.min_n, self.max_n = min_n, max_n
        self.histories: dict[str, TokenHistory] = {}

    def propose(self, sequences: list[Sequence], limits: list[int]) -> None:
        for sequence, limit in zip(sequences, limits):
            history = self.histories.setdefault(sequence.request_id, TokenHistory())
            sequence.draft_token_ids = self.lookup(history.sync(sequence.token_ids), limit)
            sequence.draft_probabilities = None  # a lookup is deterministic: a point mass on each draft

    def lookup(self, tokens: np.ndarray, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the longest matching suffix's latest earlier occurrence that is
        followed by `limit` tokens (the latest at all if none is: in a loop, the latest match is the nearest)."""
        tokens = np.asarray(tokens)
        last = len(tokens) - 1
        # Every earlier position holding the last token ends a candidate match (the suffix itself is not one).
        ends = np.flatnonzero(tokens[:last] == tokens[last])
        ends = ends[ends >= self.min_n - 1]
        lengths = np.ones(len(ends), dtype=np.int64)
        matching = np.ones(len(ends), dtype=bool)
        for back in range(1, min(self.max_n, last + 1)):  # grow each match backwards, up to max_n tokens
            matching &= (ends >= back) & (tokens[np.maximum(ends - back, 0)] == tokens[last - back])
            lengths += matching
        if not len(ends) or lengths.max() < self.min_n:
            return []
        longest = ends[lengths == lengths.max()]
        whole = longest[longest + limit < len(tokens)]  # the continuation starts right after the match
        end = int(whole[-1] if len(whole) else longest[-1])
        return tokens[end + 1:end + 1 + limit].tolist()

    def release(self, request_id: str) -> None:
        self.histories.pop(request_id, None)

    def wants_hidden_state(self, sequence: Sequence) -> bool:
        return False
