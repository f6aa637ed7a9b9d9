"""Medusa as a proposer: each request's drafts are its heads' top tokens, read from the target's final hidden state
at the position that gave its last token (kept by the engine from the step that just ran), so proposing costs the
heads alone, with no second model and no cache of its own. A chain of each head's top choice: head k's guess
follows head k-1's whether or not that one is right, and verification keeps the run up to the first miss.

A request uses its adapter's own heads when its adapter brought some, else the base model's (an adapter's hidden
states stay close enough to the base's for its heads to guess well, as LoRAX does); a request with neither gets
the other proposer's drafts, if the server has one.
"""
import torch

from loraserve.adapters.medusa_format import MedusaWeights
from loraserve.engine.proposers import Proposer
from loraserve.engine.sequence import Sequence
from loraserve.model.llama import LlamaModel
from loraserve.model.medusa import medusa_logits


class MedusaProposer:
    def __init__(self, model: LlamaModel, base_heads: MedusaWeights | None, adapter_heads: list[MedusaWeights | None],
                 others: Proposer | None) -> None:
        self.model = model
        self.base_heads = base_heads
        self.adapter_heads = adapter_heads  # by adapter slot, filled by the slot pool
        self.others = others

    def heads(self, sequence: Sequence) -> MedusaWeights | None:
        slot = sequence.adapter_slot
        own = self.adapter_heads[slot] if slot >= 0 else None
        return own if own is not None else self.base_heads

    def wants_hidden_state(self, sequence: Sequence) -> bool:
        return self.heads(sequence) is not None

    @torch.inference_mode()
    def propose(self, sequences: list[Sequence], limits: list[int]) -> None:
        """One pass of each set of heads over its requests' hidden states; requests without heads go to the
        other proposer. A request whose hidden state is not its last token's (none was kept) gets no drafts."""
        groups: dict[int, tuple[MedusaWeights, list[tuple[Sequence, int]]]] = {}
        rest: list[tuple[Sequence, int]] = []
        for sequence, limit in zip(sequences, limits):
            heads = self.heads(sequence)
            if heads is None:
                rest.append((sequence, limit))
                continue
            sequence.draft_token_ids, sequence.draft_probabilities = [], None  # drafts are a point mass
            if sequence.hidden_state is not None and sequence.hidden_state_length == sequence.num_tokens:
                groups.setdefault(id(heads), (heads, []))[1].append((sequence, limit))
        for heads, members in groups.values():
            hidden = torch.stack([sequence.hidden_state for sequence, _ in members])
            count = max(limit for _, limit in members)  # the heads past every request's limit are not run
            logits = medusa_logits(hidden, heads.block_weights[:count], heads.block_biases[:count],
                                   None if heads.projections is None else heads.projections[:count],
                                   self.model.compute_logits)
            for (sequence, limit), tokens in zip(members, logits.argmax(dim=-1).tolist()):
                sequence.draft_token_ids = tokens[:limit]
        if rest and self.others is not None:
            self.others.propose([sequence for sequence, _ in rest], [limit for _, limit in rest])

    def release(self, request_id: str) -> None:
        if self.others is not None:
            self.others.release(request_id)
