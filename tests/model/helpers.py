"""Tiny random Hugging Face Llama checkpoints, and a driver that runs our model through a shuffled paged cache."""
import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM

from loraserve.kernels.attention import AttentionMetadata
from loraserve.model.llama import LlamaModel

VOCAB_SIZE = 320
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, hello there", "paged attention caches keys"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}\n"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}\n"
    "<|{{ message['role'] }}|>\n{{ message['content'] | trim }}{{ eos_token }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_llama_config(**overrides: Any) -> LlamaConfig:
    """Small enough for CPU, with weights large enough (initializer_range) that logits are far from zero."""
    settings = dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, initializer_range=0.2,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    return LlamaConfig(**{**settings, **overrides})


def save_tiny_llama(directory: Path, seed: int = 0, bos_post_processor: bool = True, **overrides: Any) -> Path:
    """A seeded random LlamaForCausalLM saved as safetensors, with a trained byte-level BPE tokenizer."""
    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_llama_config(**overrides)).save_pretrained(directory)
    tiny_tokenizer(bos_post_processor).save(str(directory / "tokenizer.json"))
    tokenizer_config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


def tiny_tokenizer(bos_post_processor: bool) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS * 10, trainer)
    if bos_post_processor:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    return tokenizer


class PagedCache:
    """KV caches for a few sequences, each given blocks drawn at random so no table is contiguous."""

    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int = 4, seed: int = 0) -> None:
        config, parameter = model.config, next(model.parameters())
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.kv_caches = [
            (parameter.new_zeros(shape), parameter.new_zeros(shape)) for _ in range(config.num_hidden_layers)
        ]
        self.model, self.block_size = model, block_size
        self.free_blocks = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.block_tables: list[list[int]] = []
        self.lengths: list[int] = []

    def add_sequence(self, max_length: int) -> int:
        """Reserve blocks for a sequence of up to max_length tokens; returns its index."""
        num_blocks = -(-max_length // self.block_size)
        self.block_tables.append([self.free_blocks.pop() for _ in range(num_blocks)])
        self.lengths.append(0)
        return len(self.lengths) - 1

    @torch.no_grad()
    def step(self, chunks: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
        """One flat forward over (sequence, new token ids) pairs; returns each chunk's float32 logits."""
        positions, slots = [], []
        for index, ids in chunks:
            positions.append(torch.arange(self.lengths[index], self.lengths[index] + len(ids)))
            slots.append(self.slots(index, positions[-1]))
            self.lengths[index] += len(ids)
        query_lens = torch.tensor([len(ids) for _, ids in chunks])
        seq_lens = torch.tensor([self.lengths[index] for index, _ in chunks])
        max_blocks = max(len(self.block_tables[index]) for index, _ in chunks)
        tables = [self.block_tables[index] + [0] * (max_blocks - len(self.block_tables[index])) for index, _ in chunks]
        metadata = AttentionMetadata(
            slot_mapping=torch.cat(slots),
            block_tables=torch.tensor(tables, dtype=torch.int32),
            query_start_loc=torch.cat([torch.zeros(1, dtype=torch.long), query_lens.cumsum(0)]).to(torch.int32),
            seq_lens=seq_lens.to(torch.int32),
            max_query_len=int(query_lens.max()),
            max_seq_len=int(seq_lens.max()),
        )
        input_ids = torch.tensor([token for _, ids in chunks for token in ids])
        hidden = self.model(input_ids, torch.cat(positions), metadata, self.kv_caches)
        return list(self.model.compute_logits(hidden).split(query_lens.tolist()))

    def slots(self, index: int, positions: torch.Tensor) -> torch.Tensor:
        table = torch.tensor(self.block_tables[index])
        return table[positions // self.block_size] * self.block_size + positions % self.block_size


def paged_prefill(model: LlamaModel, tokens: list[int], block_size: int = 4) -> torch.Tensor:
    """Logits of every position, from one forward over the whole sequence."""
    cache = PagedCache(model, num_blocks=spare_blocks(len(tokens), block_size), block_size=block_size)
    return cache.step([(cache.add_sequence(len(tokens)), tokens)])[0]


def paged_greedy(model: LlamaModel, prompt: list[int], max_new_tokens: int, block_size: int = 4) -> list[int]:
    """Prefill the prompt, then decode one token at a time through the paged cache, always taking the argmax."""
    total = len(prompt) + max_new_tokens
    cache = PagedCache(model, num_blocks=spare_blocks(total, block_size), block_size=block_size)
    sequence = cache.add_sequence(total)
    generated, chunk = [], prompt
    for _ in range(max_new_tokens):
        chunk = [int(cache.step([(sequence, chunk)])[0][-1].argmax())]
        generated += chunk
    return generated


def spare_blocks(length: int, block_size: int) -> int:
    """Twice the blocks a sequence needs, so the shuffled ones it gets are scattered."""
    return 2 * -(-length // block_size) + 1
