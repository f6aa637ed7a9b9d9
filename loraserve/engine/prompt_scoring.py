"""Prompt logprobs: what the model gave each prompt token, from the hidden states a prefill chunk computes anyway.

The hidden state at position q scores the token at q + 1, so a chunk over positions [start, end) scores prompt
tokens start + 1 .. end (the first prompt token has no score, even after a prompt-learning adapter's virtual tokens,
whose positions come first and score nothing). Logits are made a few hundred rows at a time and
reduced at once to each token's logprob, rank and top alternatives: a long prompt never holds a [prompt x vocab]
tensor, only one slice of its chunk.
"""
import torch

from loraserve.engine.outputs import TokenLogprob
from loraserve.engine.sampler import gather_logprobs
from loraserve.engine.sequence import Sequence
from loraserve.model.llama import LlamaModel

ROWS_PER_SLICE = 256  # 256 x 49,152 float32 logits (SmolLM2) is 50 MB, and as much again for their log-softmax


def score_prompts(model: LlamaModel, hidden: torch.Tensor, sequences: list[Sequence], num_new_tokens: list[int],
                  query_ends: list[int]) -> dict[int, list[TokenLogprob]]:
    """For each sequence of the batch still scoring its prompt, by index: the scores of the prompt tokens this
    chunk newly scores, in order. Positions scored before a preemption are not scored again."""
    picks: list[tuple[int, int, int]] = []  # (row of hidden, prompt token, alternatives)
    owners: list[int] = []
    for index, (sequence, num_new) in enumerate(zip(sequences, num_new_tokens)):
        if not sequence.scoring_prompt:
            continue
        start, virtual = sequence.num_computed_tokens, sequence.num_virtual_tokens
        first_row = query_ends[index] - num_new
        for position in range(max(start, virtual + len(sequence.prompt_logprobs) - 1),
                              min(start + num_new, virtual + sequence.num_prompt_tokens - 1)):
            picks.append((first_row + position - start, sequence.token_ids[position - virtual + 1],
                          sequence.params.prompt_logprobs))
            owners.append(index)
    scores: dict[int, list[TokenLogprob]] = {}
    for begin in range(0, len(picks), ROWS_PER_SLICE):
        part = picks[begin:begin + ROWS_PER_SLICE]
        rows = torch.tensor([row for row, _, _ in part], dtype=torch.int64, device=hidden.device)
        logprobs = model.compute_logits(hidden.index_select(0, rows)).log_softmax(dim=-1)
        local = [(offset, token, count) for offset, (_, token, count) in enumerate(part)]
        for owner, score in zip(owners[begin:begin + ROWS_PER_SLICE], gather_logprobs(logprobs, local,
                                                                                             with_ranks=True)):
            scores.setdefault(owner, []).append(score)
    return scores
