"""Chooses tokens from logits, applying each request's own sampling settings, and verifies draft tokens.

A row of logits belongs to one sequence at one position: a sequence without drafts has one row; a sequence with
k drafts has k + 1, the distribution at each draft's position and then the one after the last. Greedy requests
keep the drafts that match the target's argmax, then take the target's token. Sampled requests use speculative
rejection sampling: draft d at a position is kept with probability min(1, p(d) / q(d)), and the first rejected
position is redrawn from the normalised max(0, p - q). That leaves each token distributed exactly as the target
model's p, with every sampling setting applied (q is the proposer's distribution, or a point mass for a
deterministic proposer). Random draws come from each request's own generator, so a seeded request samples the
same tokens whatever else shares its batch.
"""
from dataclasses import dataclass
from itertools import islice

import torch

from loraserve.engine.grammar import mask_logits
from loraserve.engine.outputs import TokenLogprob
from loraserve.engine.sampling_params import SamplingParams
from loraserve.engine.sequence import Sequence


@dataclass(frozen=True)
class Row:
    """One row of logits: the sequence it samples for, after its verified tokens and `num_drafts` drafts."""

    sequence: Sequence
    num_drafts: int = 0

    @property
    def params(self) -> SamplingParams:
        return self.sequence.params

    def output_token_ids(self) -> list[int]:
        return self.sequence.output_token_ids + self.sequence.draft_token_ids[:self.num_drafts]

    def token_ids(self) -> list[int]:
        return self.sequence.token_ids + self.sequence.draft_token_ids[:self.num_drafts]


@dataclass
class Sampled:
    """What one sequence gets from a step: its new tokens (accepted drafts, then one more) and their logprobs."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]
    num_drafts: int  # drafts verified
    num_accepted: int  # of those, kept


def apply_penalties(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """Repetition penalty (HF: over prompt and output) and presence/frequency penalties (OpenAI: over output), on
    a copy of `logits`: the same tensor back, uncopied, when no row asks for a penalty."""
    if all(row.params.repetition_penalty == 1.0 and not row.params.presence_penalty
           and not row.params.frequency_penalty for row in rows):
        return logits
    logits = logits.clone()
    for index, row in enumerate(rows):
        params = row.params
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(row.token_ids(), device=logits.device).unique()
            values = logits[index, seen]
            logits[index, seen] = torch.where(values > 0, values / params.repetition_penalty,
                                              values * params.repetition_penalty)
        if params.presence_penalty or params.frequency_penalty:
            output = torch.tensor(row.output_token_ids(), dtype=torch.int64, device=logits.device)
            counts = torch.bincount(output, minlength=logits.shape[1]).to(logits.dtype)
            logits[index] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    return logits


def truncate_distribution(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, each per row; removed tokens get -inf. Logits a tiny repetition
    penalty or temperature sent to +inf are held at the largest float, so that the softmaxes here and after give
    a distribution (those tokens share it) rather than NaN, whose draw could be a token a grammar forbids."""
    device = logits.device
    temperature = torch.tensor([p.temperature or 1.0 for p in params], device=device)
    logits = (logits / temperature[:, None]).clamp(max=torch.finfo(logits.dtype).max)
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    if any(top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(logits.shape[1], device=device)[None, :]
        k = torch.tensor([min(value or logits.shape[1], logits.shape[1]) for value in top_k], device=device)
        drop = ranks >= k[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        sorted_probs = sorted_logits.softmax(dim=-1)  # top-p judges what top-k kept, renormalised (as HF does)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop |= mass_before >= torch.tensor(top_p, device=device)[:, None]
        drop[:, 0] = False  # the top token always stays, even for a top_p that float32 rounds to 0
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    min_p = torch.tensor([p.min_p for p in params], device=device)
    if bool((min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values,
                                    float("-inf"))
    return logits


def sampling_probabilities(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """The distribution each row samples from: penalised logits, truncated, softmaxed (float32)."""
    return truncate_distribution(logits, [row.params for row in rows]).softmax(dim=-1)


def draw(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token with probability proportional to `weights` (need not sum to one): where one uniform draw falls in
    their cumulative sum, summed in float64 so that no token's share is lost to rounding. PyTorch's exponential
    and multinomial draws take about a millisecond a row on the CPU over a 49k-token vocabulary (a batch of 16
    sampled requests decoded at 0.56 of greedy speed); this takes about 60 us. A token of weight zero is never
    drawn. Returned as a 0-dim tensor, so a step's draws reach the host in one read."""
    cumulative = weights.double().cumsum(dim=0)
    total = cumulative[-1:]
    point = torch.rand(1, dtype=torch.float64, generator=generator, device=weights.device) * total
    point = torch.minimum(point, total.nextafter(torch.zeros_like(total)))  # below the total, whatever rounding did
    # The weights truncate_distribution makes are finite (it holds infinite logits at the largest float); should a
    # caller's not be, the draw is still a token of the vocabulary.
    return torch.searchsorted(cumulative, point, right=True)[0].clamp(max=weights.shape[0] - 1)


def gather_logprobs(logprobs: torch.Tensor, picks: list[tuple[int, int, int | None]], with_ranks: bool = False
                    ) -> list[TokenLogprob | None]:
    """For each (row, token, alternatives wanted or None): the token's log-probability under the model and the
    most likely alternatives, where asked, and its rank with `with_ranks` (only prompt scores report it). One read
    from the device for all of them, not one per token."""
    wanted = [index for index, (_, _, count) in enumerate(picks) if count is not None]
    results: list[TokenLogprob | None] = [None] * len(picks)
    if not wanted:
        return results
    rows = torch.tensor([picks[index][0] for index in wanted], device=logprobs.device)
    tokens = torch.tensor([picks[index][1] for index in wanted], device=logprobs.device)
    selected = logprobs[rows]
    chosen = selected[torch.arange(len(wanted), device=logprobs.device), tokens]
    ranks = ((selected > chosen[:, None]).sum(dim=-1) + 1).tolist() if with_ranks else [1] * len(wanted)
    most = max(picks[index][2] for index in wanted)
    top_values, top_ids = selected.topk(most, dim=-1) if most else (torch.empty(len(wanted), 0),) * 2
    for index, value, rank, values, ids in zip(wanted, chosen.tolist(), ranks, top_values.tolist(),
                                               top_ids.tolist()):
        _, token, count = picks[index]
        results[index] = TokenLogprob(token, value, [(int(i), v) for i, v in zip(ids, values)][:count], rank)
    return results


def accept_sampled(drafts: list[int], probs: torch.Tensor, draft_probs: torch.Tensor | None,
                   generator: torch.Generator) -> tuple[list[int], torch.Tensor]:
    """Rejection sampling of one sequence's drafts against target probabilities `probs` [k + 1, vocab]; return
    the accepted drafts and the token drawn after them (from `draw`)."""
    k = len(drafts)
    if k:
        positions = torch.arange(k, device=probs.device)
        draft_ids = torch.tensor(drafts, device=probs.device)
        target = probs[positions, draft_ids]
        proposed = draft_probs[positions, draft_ids] if draft_probs is not None else torch.ones_like(target)
        uniform = torch.rand(k, generator=generator, device=probs.device)
        kept = (uniform * proposed < target).tolist()  # u < p / q, without dividing by a q of zero
        if not all(kept):
            rejected = kept.index(False)
            return drafts[:rejected], draw(residual(probs[rejected], draft_probs, rejected, drafts), generator)
    return drafts, draw(probs[k], generator)


def residual(target: torch.Tensor, draft_probs: torch.Tensor | None, position: int, drafts: list[int]
             ) -> torch.Tensor:
    """max(0, p - q) at a rejected position; for a point-mass proposal that is p without the draft token."""
    if draft_probs is None:
        weights = target.clone()
        weights[drafts[position]] = 0.0
    else:
        weights = (target - draft_probs[position]).clamp(min=0.0)
    return weights if bool(weights.sum() > 0) else target  # p == q up to rounding: nothing to correct


def accept_greedy(drafts: list[int], argmax: list[int]) -> list[int]:
    """The drafts up to the first that differs from the target's argmax, then the target's token there."""
    for position, draft in enumerate(drafts):
        if argmax[position] != draft:
            return drafts[:position] + [argmax[position]]
    return drafts + [argmax[len(drafts)]]


def sample(logits: torch.Tensor, sequences: list[Sequence]) -> list[Sampled]:
    """New tokens of each sequence, from `logits` with 1 + len(draft_token_ids) rows per sequence, in order."""
    rows = [Row(sequence, index) for sequence in sequences for index in range(len(sequence.draft_token_ids) + 1)]
    logits = logits.float()
    wants_logprobs = any(sequence.params.logprobs is not None for sequence in sequences)
    logprobs = logits.log_softmax(dim=-1) if wants_logprobs else logits
    constrained = mask_logits(apply_penalties(logits, rows),
                              [(sequence.grammar_matcher, sequence.draft_token_ids, sequence.params.greedy)
                               for sequence in sequences])
    tokens, starts = choose_tokens(constrained, rows, sequences)
    picks = [(start + offset, token, sequence.params.logprobs)
             for sequence, sequence_tokens, start in zip(sequences, tokens, starts)
             for offset, token in enumerate(sequence_tokens)]
    token_logprobs = iter(gather_logprobs(logprobs, picks))
    return [Sampled(sequence_tokens, list(islice(token_logprobs, len(sequence_tokens))),
                    len(sequence.draft_token_ids), len(sequence_tokens) - 1)
            for sequence, sequence_tokens in zip(sequences, tokens)]


def choose_tokens(logits: torch.Tensor, rows: list[Row], sequences: list[Sequence]
                  ) -> tuple[list[list[int]], list[int]]:
    """Each sequence's accepted drafts and the token after them, from its penalised logits rows; and the index
    of each sequence's first row."""
    argmax = logits.argmax(dim=-1).tolist()
    sampled_rows = [index for index, row in enumerate(rows) if not row.params.greedy]
    probs = sampling_probabilities(logits[sampled_rows], [rows[index] for index in sampled_rows])
    tokens: list[list[int]] = []
    starts: list[int] = []
    drawn: list[tuple[int, torch.Tensor]] = []  # (sequence, its last token), read from the device all at once
    start, sampled_start = 0, 0
    for index, sequence in enumerate(sequences):
        drafts, num_rows = sequence.draft_token_ids, len(sequence.draft_token_ids) + 1
        if sequence.params.greedy:
            tokens.append(accept_greedy(drafts, argmax[start:start + num_rows]))
        else:
            accepted, last = accept_sampled(drafts, probs[sampled_start:sampled_start + num_rows],
                                            sequence.draft_probabilities, sequence.generator)
            tokens.append(list(accepted))
            drawn.append((index, last))
            sampled_start += num_rows
        starts.append(start)
        start += num_rows
    if drawn:
        for (index, _), token in zip(drawn, torch.stack([last for _, last in drawn]).tolist()):
            tokens[index].append(token)
    return tokens, starts
