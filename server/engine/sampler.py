"""Chooses each sequence's next token from its logits, applying that request's own sampling settings.

Random draws come from each request's own generator, so a seeded request samples the same tokens whatever else
shares its batch.
"""
import torch

from server.engine.outputs import TokenLogprob
from server.engine.sequence import Sequence


def apply_penalties(logits: torch.Tensor, sequences: list[Sequence]) -> torch.Tensor:
    """Repetition penalty (HF: over prompt and output) and presence/frequency penalties (OpenAI: over output)."""
    for row, sequence in enumerate(sequences):
        params = sequence.params
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(sequence.token_ids, device=logits.device).unique()
            values = logits[row, seen]
            logits[row, seen] = torch.where(values > 0, values / params.repetition_penalty,
                                            values * params.repetition_penalty)
        if params.presence_penalty or params.frequency_penalty:
            output = torch.tensor(sequence.output_token_ids, dtype=torch.int64, device=logits.device)
            counts = torch.bincount(output, minlength=logits.shape[1]).to(logits.dtype)
            logits[row] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    return logits


def truncate_distribution(logits: torch.Tensor, sequences: list[Sequence]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, each per row; removed tokens get -inf."""
    device = logits.device
    temperature = torch.tensor([s.params.temperature or 1.0 for s in sequences], device=device)
    logits = logits / temperature[:, None]
    top_k = [s.params.top_k for s in sequences]
    top_p = [s.params.top_p for s in sequences]
    if any(top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(logits.shape[1], device=device)[None, :]
        k = torch.tensor([value or logits.shape[1] for value in top_k], device=device)
        drop = ranks >= k[:, None]
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop |= mass_before >= torch.tensor(top_p, device=device)[:, None]  # keeps at least the top token
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    min_p = torch.tensor([s.params.min_p for s in sequences], device=device)
    if bool((min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values,
                                    float("-inf"))
    return logits


def draw(logits: torch.Tensor, sequences: list[Sequence]) -> list[int]:
    """Sample one token per row: argmax of probabilities over exponential noise from the row's own generator."""
    probs = logits.softmax(dim=-1)
    tokens = []
    for row, sequence in enumerate(sequences):
        noise = torch.empty_like(probs[row]).exponential_(generator=sequence.generator)
        tokens.append(int((probs[row] / noise).argmax()))
    return tokens


def gather_logprobs(logprobs: torch.Tensor, tokens: list[int], sequences: list[Sequence]
                    ) -> list[TokenLogprob | None]:
    """The chosen token's log-probability under the model, and the top alternatives when asked."""
    results: list[TokenLogprob | None] = []
    for row, (token, sequence) in enumerate(zip(tokens, sequences)):
        count = sequence.params.logprobs
        if count is None:
            results.append(None)
            continue
        top_values, top_ids = logprobs[row].topk(count) if count else (torch.empty(0), torch.empty(0))
        top = [(int(i), float(v)) for i, v in zip(top_ids.tolist(), top_values.tolist())]
        results.append(TokenLogprob(token, float(logprobs[row, token]), top))
    return results


def sample(logits: torch.Tensor, sequences: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
    """Next token of each sequence (rows of `logits` in the same order), with logprobs where requested."""
    logits = logits.float()
    wants_logprobs = any(s.params.logprobs is not None for s in sequences)
    logprobs = logits.log_softmax(dim=-1) if wants_logprobs else logits
    logits = apply_penalties(logits.clone(), sequences)
    tokens = logits.argmax(dim=-1).tolist()
    sampled_rows = [row for row, s in enumerate(sequences) if not s.params.greedy]
    if sampled_rows:
        subset = [sequences[row] for row in sampled_rows]
        drawn = draw(truncate_distribution(logits[sampled_rows], subset), subset)
        for row, token in zip(sampled_rows, drawn):
            tokens[row] = token
    return tokens, gather_logprobs(logprobs, tokens, sequences)
