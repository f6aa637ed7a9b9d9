"""Random paged-cache batches and a float64 attention computed directly, independent of the kernels."""
import torch

from loraserve.kernels.attention import AttentionMetadata


def relative_error(output: torch.Tensor, expected: torch.Tensor) -> float:
    return ((output.double() - expected.double()).norm() / expected.double().norm()).item()


def make_batch(
    query_lens: list[int],
    seq_lens: list[int],
    num_kv_heads: int,
    group: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Query and filled caches for sequences whose block tables are random and share their first block."""
    blocks_per_seq = [(length + block_size - 1) // block_size for length in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    permutation = torch.randperm(num_blocks, generator=generator)
    shared = permutation[0].item()
    max_blocks = max(blocks_per_seq) + 1
    tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    next_free = 1
    for index, count in enumerate(blocks_per_seq):
        # Sequences 0 and 1 share their first block, as a prefix-cache hit would.
        first = shared if index < 2 else permutation[next_free].item()
        next_free += index >= 2
        rest = permutation[next_free:next_free + count - 1]
        next_free += count - 1
        tables[index, :count] = torch.cat([torch.tensor([first]), rest]).int()
    query_start_loc = torch.tensor([0] + query_lens).cumsum(0).int()
    num_tokens = sum(query_lens)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)

    metadata = AttentionMetadata(
        slot_mapping=torch.zeros(num_tokens, dtype=torch.int64, device=device),
        block_tables=tables.to(device),
        query_start_loc=query_start_loc.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    )
    query = rand(num_tokens, num_kv_heads * group, head_dim)
    key_cache = rand(num_blocks, block_size, num_kv_heads, head_dim)
    value_cache = rand(num_blocks, block_size, num_kv_heads, head_dim)
    return query, key_cache, value_cache, metadata


def attention_float64(
    query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Per sequence, per query head: gather its context slot by slot and take a causal softmax in float64."""
    block_size, num_kv_heads = key_cache.shape[1:3]
    group = query.shape[1] // num_kv_heads
    output = torch.empty(query.shape, dtype=torch.float64)
    starts, seq_lens, tables = (tensor.cpu().long() for tensor in
                                (metadata.query_start_loc, metadata.seq_lens, metadata.block_tables))
    for sequence in range(len(seq_lens)):
        start, end, length = starts[sequence].item(), starts[sequence + 1].item(), seq_lens[sequence].item()
        positions = torch.arange(length)
        slots = tables[sequence, positions // block_size] * block_size + positions % block_size
        keys = key_cache.flatten(0, 1)[slots.to(key_cache.device)].cpu().double()  # [length, kv_heads, dim]
        values = value_cache.flatten(0, 1)[slots.to(value_cache.device)].cpu().double()
        queries = query[start:end].cpu().double()
        query_positions = length - (end - start) + torch.arange(end - start)
        mask = positions[None, :] <= query_positions[:, None]
        for head in range(query.shape[1]):
            scores = queries[:, head] @ keys[:, head // group].T * scale
            weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            output[start:end, head] = weights @ values[:, head // group]
    return output
