"""A draft model proposes tokens by running ahead of the target: a smaller model with the same vocabulary,
with its own paged KV cache, block manager and runner (it takes no adapters).

Each request gets a shadow sequence in the draft's cache, holding the target's verified tokens and, while a
proposal is made, the drafts (as `draft_token_ids`, like the target's own). When the target's verification comes
back, the shadow keeps the KV of the drafts that were accepted and rolls back the rest, so a step normally costs
the draft one or two catch-up tokens, then one token per further draft. The draft's cache is prefix-cached like
the target's (keys hold verified tokens only), so requests sharing a prompt prefill it in the draft once. A
shadow lives until its request finishes (a preempted request keeps its tokens, so its shadow stays valid); when
the draft's cache is full, the requests that do not fit get no drafts that step.
"""
import dataclasses

import torch

from loraserve.engine.block_manager import BlockManager
from loraserve.engine.model_runner import ModelRunner
from loraserve.engine.sampler import Row, apply_penalties, draw, sampling_probabilities
from loraserve.engine.scheduler import ScheduledBatch
from loraserve.engine.sequence import Sequence
from loraserve.model.loader import LoadedModel


class DraftModelProposer:
    """Owns the draft model's runner, KV cache and block manager, and each running request's shadow."""

    def __init__(self, draft: LoadedModel, num_blocks: int, block_size: int, max_num_batched_tokens: int) -> None:
        self.runner = ModelRunner(draft.model, draft.config, num_blocks, block_size, lora_weights=[],
                                  virtual_tokens=[])  # its sequences hold no adapter slot
        self.block_manager = BlockManager(num_blocks, block_size)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_length = draft.config.max_position_embeddings  # no draft past the draft model's context
        self.shadows: dict[str, Sequence] = {}

    def propose(self, sequences: list[Sequence], limits: list[int]) -> None:
        """Run the draft model `max(limits)` steps over all sequences at once, each step sampling one more draft
        per sequence (as its request would sample: greedy, or from q, the draft's processed distribution)."""
        shadows = [self._sync(sequence) for sequence in sequences]
        limits = [min(limit, self.max_length - sequence.num_tokens) for sequence, limit in zip(sequences, limits)]
        probabilities: list[list[torch.Tensor]] = [[] for _ in sequences]
        active = list(range(len(sequences)))
        for step in range(max(limits, default=0)):
            active = self._run_step([index for index in active if limits[index] > step], shadows, probabilities)
        for sequence, shadow, probs in zip(sequences, shadows, probabilities):
            sequence.draft_token_ids = list(shadow.draft_token_ids)
            sequence.draft_probabilities = torch.stack(probs) if probs else None

    def _run_step(self, active: list[int], shadows: list[Sequence], probabilities: list[list[torch.Tensor]]
                  ) -> list[int]:
        """One draft-model step for the `active` shadows: a token each, or a chunk of catch-up prefill (within
        the token budget) for those behind. Return those that drafted a token and may go on."""
        batch, budget = ScheduledBatch([], []), self.max_num_batched_tokens
        for index in active:
            shadow = shadows[index]
            prefix = self.block_manager.cached_prefix(shadow) if not shadow.block_table else ()
            num_new = min(shadow.num_uncomputed_tokens - len(prefix) * self.block_manager.block_size, budget)
            if num_new <= 0 or not self.block_manager.can_allocate(shadow, num_new, prefix):
                continue
            self.block_manager.allocate(shadow, num_new, prefix)
            batch.sequences.append(shadow)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        if batch.empty:
            return []
        logits, sampling, _, _ = self.runner.execute(batch)
        for shadow, num_new in zip(batch.sequences, batch.num_new_tokens):
            shadow.num_computed_tokens += num_new
        sampled = [batch.sequences[row] for row in sampling]
        tokens, probs = self._choose(logits, sampled)
        by_shadow = {id(shadow): index for index, shadow in enumerate(shadows)}
        drafting = []
        for shadow, token, prob in zip(sampled, tokens, probs):
            index = by_shadow[id(shadow)]
            shadow.draft_token_ids.append(token)
            if prob is not None:
                probabilities[index].append(prob)
            drafting.append(index)
        return drafting

    @staticmethod
    def _choose(logits: torch.Tensor, shadows: list[Sequence]) -> tuple[list[int], list[torch.Tensor | None]]:
        """Each shadow's next draft: the argmax for greedy requests, else a draw from q (kept for verification).
        Penalties count the drafts before it, as the target's verification will."""
        rows = [Row(shadow, len(shadow.draft_token_ids)) for shadow in shadows]
        logits = apply_penalties(logits.float(), rows)
        tokens: list[int] = logits.argmax(dim=-1).tolist()
        probs: list[torch.Tensor | None] = [None] * len(shadows)
        sampled = [index for index, shadow in enumerate(shadows) if not shadow.params.greedy]
        distributions = sampling_probabilities(logits[sampled], [rows[index] for index in sampled])
        draws = [draw(distribution, shadows[index].generator) for index, distribution in zip(sampled, distributions)]
        for index, distribution, token in zip(sampled, distributions, torch.stack(draws).tolist() if draws else []):
            tokens[index] = token
            probs[index] = distribution
        return tokens, probs

    def _sync(self, sequence: Sequence) -> Sequence:
        """Bring the request's shadow up to the target's verified tokens: keep the KV of the accepted drafts,
        roll back the rest, and queue the tokens the draft has not seen for catch-up."""
        shadow = self.shadows.get(sequence.request_id)
        if shadow is None:
            # The draft samples as the request does, but never scores its prompt (the target does that).
            params = dataclasses.replace(sequence.params, prompt_logprobs=None)
            shadow = Sequence(sequence.request_id, list(sequence.token_ids), sequence.num_prompt_tokens, params,
                              sequence.generator)
            self.shadows[sequence.request_id] = shadow
            return shadow
        new_tokens = sequence.token_ids[shadow.num_tokens:]
        accepted = 0
        while accepted < min(len(new_tokens), len(shadow.draft_token_ids)) and \
                new_tokens[accepted] == shadow.draft_token_ids[accepted]:
            accepted += 1
        agreed = shadow.num_tokens + accepted
        shadow.truncate_drafts()
        shadow.token_ids.extend(new_tokens)
        # The last token is computed again when the target gained none (it was not scheduled): its logits are needed.
        shadow.num_computed_tokens = min(shadow.num_computed_tokens, agreed, shadow.num_tokens - 1)
        self.block_manager.rollback(shadow)
        return shadow

    def release(self, request_id: str) -> None:
        shadow = self.shadows.pop(request_id, None)
        if shadow is not None:
            self.block_manager.free(shadow)

    def wants_hidden_state(self, sequence: Sequence) -> bool:
        return False
