"""CUDA graphs of decode steps. A small model's decode step is hundreds of short kernel launches, so the GPU
waits on the CPU; replaying the step as one captured graph removes that wait.

Graphs are captured once, at start-up, for a set of batch sizes, each over fixed input buffers. A decode-only
step of n sequences copies its inputs into the buffers of the smallest captured size >= n (padding rows write no
KV and their outputs are dropped) and replays. Attention is captured for the longest context, since its launch
grid depends only on that; LoRA over a padded mapping with a group per row (the step's slots first, empty groups
after) reading pages up to the largest rank, so any mix of adapters replays the same graph. Each size has a graph
without LoRA too, for steps where no request has an adapter.
"""
from dataclasses import dataclass

import torch

from loraserve.kernels.attention import AttentionMetadata
from loraserve.kernels.lora import LoraWeights, PaddedLoraMapping
from loraserve.model.llama import LlamaModel

CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)


@dataclass
class CapturedStep:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # the graph's output buffer: [size, hidden_size]


class DecodeGraphs:
    """Owns the static buffers and the captured graphs of one model and KV cache."""

    def __init__(self, model: LlamaModel, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 lora_weights: list[dict[str, LoraWeights]], max_num_seqs: int, max_model_len: int,
                 block_size: int) -> None:
        device = next(model.parameters()).device
        self.model, self.kv_caches, self.lora_weights = model, kv_caches, lora_weights
        self.max_model_len = max_model_len
        self.sizes = sorted({size for size in CAPTURE_SIZES if size < max_num_seqs} | {max_num_seqs})
        capacity = self.sizes[-1]
        self.input_ids = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.positions = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((capacity,), -1, dtype=torch.int64, device=device)
        max_blocks = (max_model_len + block_size - 1) // block_size
        self.block_tables = torch.zeros(capacity, max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(capacity + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(capacity, dtype=torch.int32, device=device)
        self.lora = PaddedLoraMapping.allocate(capacity, device) if lora_weights else None
        self.steps: dict[tuple[int, bool], CapturedStep] = {}
        self.num_replays = 0

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1]

    @torch.inference_mode()
    def capture(self) -> None:
        """Largest size first, all in one memory pool: smaller graphs reuse the larger ones' memory."""
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            for with_lora in (False, True) if self.lora is not None else (False,):
                self._warm_up(size, with_lora)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    hidden = self._forward(size, with_lora)
                self.steps[size, with_lora] = CapturedStep(graph, hidden)

    def _warm_up(self, size: int, with_lora: bool) -> None:
        """One run before capture, on a side stream as PyTorch asks: Triton compiles its kernels and lazily made
        tensors (the LoRA slice offsets) exist before the graph records anything."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(size, with_lora)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    def _forward(self, size: int, with_lora: bool) -> torch.Tensor:
        metadata = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
            query_start_loc=self.query_start_loc[:size + 1], seq_lens=self.seq_lens[:size],
            max_query_len=1, max_seq_len=self.max_model_len)
        mapping = self.lora.prefix(size) if with_lora else None
        return self.model(self.input_ids[:size], self.positions[:size], metadata, self.kv_caches,
                          self.lora_weights if with_lora else None, mapping)

    def fits(self, num_new_tokens: list[int]) -> bool:
        """Whether a step is decode-only and small enough to replay."""
        return len(num_new_tokens) <= self.max_batch_size and all(count == 1 for count in num_new_tokens)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
            token_slots: list[int]) -> torch.Tensor:
        """The model's hidden states [n, hidden_size] for a decode step of n sequences, by replay."""
        count = input_ids.shape[0]
        size = next(size for size in self.sizes if size >= count)
        with_lora = self.lora is not None and any(slot >= 0 for slot in token_slots)
        self.input_ids[:count].copy_(input_ids)
        self.positions[:count].copy_(positions)
        self.slot_mapping[:count].copy_(metadata.slot_mapping)
        self.slot_mapping[count:size].fill_(-1)  # padding rows write no KV
        self.seq_lens[:count].copy_(metadata.seq_lens)
        self.seq_lens[count:size].fill_(1)
        self.block_tables[:count, :metadata.block_tables.shape[1]].copy_(metadata.block_tables)
        if with_lora:
            self.lora.fill(token_slots)
        step = self.steps[size, with_lora]
        step.graph.replay()
        self.num_replays += 1
        return step.hidden[:count]
