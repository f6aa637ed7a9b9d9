"""Turns a scheduled batch into flat tensors, runs the model over the paged KV cache, returns logits."""
from typing import NamedTuple

import torch

from loraserve.adapters.prompt_learning import VirtualTokens
from loraserve.kernels.attention import AttentionMetadata
from loraserve.kernels.lora import LoraMapping, LoraWeights
from loraserve.engine.cuda_graphs import DecodeGraphs
from loraserve.engine.outputs import TokenLogprob
from loraserve.engine.prompt_scoring import score_prompts
from loraserve.engine.scheduler import ScheduledBatch
from loraserve.engine.sequence import VIRTUAL_TOKEN, Sequence
from loraserve.model.config import ModelConfig
from loraserve.model.llama import LlamaModel


class StepOutput(NamedTuple):
    """What one step computed: see `ModelRunner.execute`."""

    logits: torch.Tensor  # [rows, vocab], float32
    sampling: list[int]  # the batch indices of the sequences the rows belong to, in order
    prompt_scores: dict[int, list[TokenLogprob]]  # by batch index
    hidden: torch.Tensor  # [rows, hidden]: the final hidden state each row's logits were computed from


def kv_block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one KV block takes across all layers (keys and values)."""
    element_size = torch.empty((), dtype=dtype).element_size()
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * element_size
    return per_token * block_size


class ModelRunner:
    """Owns the model and its KV cache, and reads the adapter slots the registry fills (LoRA pages, and the
    virtual tokens of prompt-learning adapters, by slot); one call per step."""

    def __init__(self, model: LlamaModel, config: ModelConfig, num_blocks: int, block_size: int,
                 lora_weights: list[dict[str, LoraWeights]], virtual_tokens: list[VirtualTokens | None]) -> None:
        self.model = model
        self.lora_weights = lora_weights
        self.virtual_tokens = virtual_tokens  # by slot
        self.block_size = block_size
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        # Zeroed, not empty: masked-out garbage could hold NaN, and NaN times a zero weight is still NaN.
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.dtype, device=self.device),
             torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in range(config.num_hidden_layers)
        ]
        self.graphs: DecodeGraphs | None = None

    def capture_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """Capture decode steps of up to `max_num_seqs` sequences as CUDA graphs; later decode-only steps that
        fit replay them."""
        graphs = DecodeGraphs(self.model, self.kv_caches, self.lora_weights, max_num_seqs, max_model_len,
                              self.block_size)
        graphs.capture()
        self.graphs = graphs

    def _scaled(self, token_slots: list[int]) -> bool:
        """Whether a token's adapter is DoRA: its column scales are applied eagerly, never in a graph."""
        scale_pages = self.lora_weights[0]["qkv_proj"].scale_pages if self.lora_weights else None
        return scale_pages is not None and any(scale_pages[slot] for slot in set(token_slots) if slot >= 0)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepOutput:
        """Compute the batch's new tokens. Return the logits of the sequences whose chunk reaches their last
        token (they sample next, unless they only score their prompt), those sequences' indices in the batch, the
        prompt tokens' scores of the sequences that asked, by index, and the hidden states the logits came from
        (the rows the head read, not a copy; proposers that guess from them keep the rows they need). A sampling
        sequence gets a row for each new position from its last verified token on, in order: the logits that
        verify its drafts, then the one after them (a single row without drafts)."""
        self._write_given_kv(batch.sequences)
        input_ids, positions, metadata, query_ends = self._prepare(batch)
        embeddings = self._virtual_embeddings(batch, query_ends)
        token_slots = [slot for sequence, num_new in zip(batch.sequences, batch.num_new_tokens)
                       for slot in [self._lora_slot(sequence)] * num_new]
        if self.graphs is not None and self.graphs.fits(batch.num_new_tokens) and not self._scaled(token_slots) \
                and embeddings is None:
            hidden = self.graphs.run(input_ids, positions, metadata, token_slots)
        else:
            lora = LoraMapping.from_token_slots(token_slots, self.device)
            hidden = self.model(input_ids, positions, metadata, self.kv_caches, self.lora_weights, lora, embeddings)
        for sequence in batch.sequences:
            sequence.pending_virtual_kv = None  # written, and the step that reads it has run
        sampling = [
            index for index, (sequence, num_new) in enumerate(zip(batch.sequences, batch.num_new_tokens))
            if sequence.num_computed_tokens + num_new == sequence.num_tokens + len(sequence.draft_token_ids)
            and sequence.params.max_tokens > 0
        ]
        rows = [row for index in sampling
                for row in range(query_ends[index] - self._num_sampled_rows(batch.sequences[index],
                                                                            batch.num_new_tokens[index]),
                                 query_ends[index])]
        rows_tensor = torch.tensor(rows, dtype=torch.int64, device=self.device)
        scores = score_prompts(self.model, hidden, batch.sequences, batch.num_new_tokens, query_ends)
        sampled_hidden = hidden.index_select(0, rows_tensor)
        return StepOutput(self.model.compute_logits(sampled_hidden), sampling, scores, sampled_hidden)

    @staticmethod
    def _num_sampled_rows(sequence: Sequence, num_new: int) -> int:
        """New positions from the last verified token on: 1 + drafts in a verification step, 1 otherwise (a
        draft model computing its newest draft included)."""
        end = sequence.num_computed_tokens + num_new
        return end - max(sequence.num_computed_tokens, sequence.num_tokens - 1)

    def _lora_slot(self, sequence: Sequence) -> int:
        """The slot whose LoRA pages the sequence's tokens read: none for a prompt-learning adapter's."""
        slot = sequence.adapter_slot
        return slot if slot < 0 or self.virtual_tokens[slot] is None else -1

    def _write_given_kv(self, sequences: list[Sequence]) -> None:
        """Write a prefix-tuning adapter's keys and values, as they are, at the virtual positions a newly admitted
        sequence did not find in the prefix cache (`pending_virtual_kv`)."""
        for sequence in sequences:
            if sequence.pending_virtual_kv is None:
                continue
            start, end = sequence.pending_virtual_kv
            key_values = self.virtual_tokens[sequence.adapter_slot].key_values  # [layers, 2, virtual, width]
            slots = torch.tensor(self._cache_slots(sequence, start, end), dtype=torch.int64, device=self.device)
            for layer, caches in enumerate(self.kv_caches):
                for cache, given in zip(caches, key_values[layer]):
                    flat = cache.view(-1, *cache.shape[2:])
                    flat.index_copy_(0, slots, given[start:end].view(-1, *cache.shape[2:]).to(cache.dtype))

    def _virtual_embeddings(self, batch: ScheduledBatch, query_ends: list[int]
                            ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, embeddings) of the prompt-tuning virtual tokens this step computes, or None if it has none."""
        rows: list[int] = []
        parts: list[torch.Tensor] = []
        for sequence, num_new, end in zip(batch.sequences, batch.num_new_tokens, query_ends):
            start = sequence.num_computed_tokens
            if start >= sequence.num_virtual_tokens or sequence.virtual_kv_given:
                continue
            last = min(start + num_new, sequence.num_virtual_tokens)
            rows.extend(range(end - num_new, end - num_new + last - start))
            parts.append(self.virtual_tokens[sequence.adapter_slot].embeddings[start:last])
        if not rows:
            return None
        return torch.tensor(rows, dtype=torch.int64, device=self.device), torch.cat(parts)

    def _cache_slots(self, sequence: Sequence, start: int, end: int) -> list[int]:
        """Where positions [start, end) of the sequence sit in the KV cache, through its block table."""
        table = sequence.block_table
        return [table[position // self.block_size] * self.block_size + position % self.block_size
                for position in range(start, end)]

    def _prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        query_start = [0]
        for sequence, num_new in zip(batch.sequences, batch.num_new_tokens):
            start, end = sequence.num_computed_tokens, sequence.num_computed_tokens + num_new
            ids = sequence.tokens_between(start, end)
            if start < sequence.num_virtual_tokens:  # rows whose embeddings the adapter gives: any id will do
                ids = [0 if token == VIRTUAL_TOKEN else token for token in ids]
            tokens.extend(ids)
            positions.extend(range(start, end))
            slots.extend(self._cache_slots(sequence, start, end))
            seq_lens.append(end)
            query_start.append(query_start[-1] + num_new)
        max_blocks = max(len(sequence.block_table) for sequence in batch.sequences)
        tables = [sequence.block_table + [0] * (max_blocks - len(sequence.block_table))
                  for sequence in batch.sequences]
        device = self.device
        metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            max_query_len=max(batch.num_new_tokens),
            max_seq_len=max(seq_lens),
        )
        return (torch.tensor(tokens, dtype=torch.int64, device=device),
                torch.tensor(positions, dtype=torch.int64, device=device), metadata, query_start[1:])
