"""The paged KV cache's bookkeeping: which blocks are free, who holds which, and which full blocks are cached.

Prefix caching: every full block gets a key chained from its parent block's digest, its tokens and the request's
adapter version, so a later request whose prompt starts the same way takes those blocks instead of computing them
again. A block is keyed when it is allocated for the tokens that fill it: a request admitted later in the same
step may share it, since every attention layer writes the whole batch's keys and values before any token attends.
A block nobody holds keeps its key in the free queue, which doubles as the cache's LRU: blocks are reused from its
head, and a cached block loses its key only when it is reused.
"""
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from loraserve.adapters.records import AdapterRef
from loraserve.engine.sequence import Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    """How many blocks `num_tokens` tokens fill (the last one may be partial)."""
    return (num_tokens + block_size - 1) // block_size


@dataclass(frozen=True)
class BlockKey:
    """Everything a full block's KV depends on: all tokens before it (through its parent's digest), its own
    tokens, and the adapter version that computed it. The cache is a dict keyed by it, so a match compares the
    tokens and the adapter, not only a hash."""

    parent_digest: bytes  # b"" for a sequence's first block
    token_ids: tuple[int, ...]
    adapter: AdapterRef | None

    def digest(self) -> bytes:
        """What the next block chains from. SHA-256 rather than Python's hash(), which is predictable for ints:
        clients choose the tokens, and must not be able to craft a prefix that collides with another's."""
        return hashlib.sha256(repr((self.parent_digest, self.token_ids, self.adapter)).encode()).digest()


class PrefixCacheListener(Protocol):
    """Told of cache lookups and evictions (the metrics; the block manager knows nothing of Prometheus)."""

    def prefix_cache_queried(self, num_tokens: int, num_hit_tokens: int) -> None: ...

    def prefix_cache_evicted(self) -> None: ...


class BlockManager:
    """Hands out fixed-size KV blocks, shares cached full blocks between requests, and takes blocks back when
    their last holder lets go. Only the request that allocated a block writes it, in the step that keyed it;
whoever shares it then only reads it, and writes past it."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 listener: PrefixCacheListener | None = None) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.listener = listener
        self.reference_counts = [0] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # head: reused first
        self.block_keys: list[BlockKey | None] = [None] * num_blocks  # set exactly for the blocks in `cached`
        self.cached: dict[BlockKey, int] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody holds, cached or not: all can be handed out."""
        return len(self.free_queue)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by some sequence."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def block_key(self, sequence: Sequence, index: int, parent_digest: bytes) -> BlockKey:
        start = index * self.block_size
        return BlockKey(parent_digest, tuple(sequence.tokens_between(start, start + self.block_size)), sequence.adapter)

    def cached_prefix(self, sequence: Sequence) -> tuple[int, ...]:
        """The cached blocks holding the longest run of `sequence`'s leading full blocks. The block with its last
        token never counts, so the step computing that token yields the logits that sample the next one. A request
        still scoring its prompt takes none: its positions' logits are needed (caching never changes a score)."""
        if not self.enable_caching or sequence.scoring_prompt:
            return ()
        blocks: list[int] = []
        parent_digest = b""
        for index in range((sequence.num_tokens - 1) // self.block_size):
            key = self.block_key(sequence, index, parent_digest)
            block = self.cached.get(key)
            if block is None:
                break
            blocks.append(block)
            parent_digest = key.digest()
        return tuple(blocks)

    def blocks_needed(self, sequence: Sequence, num_new_tokens: int, prefix: tuple[int, ...] = ()) -> int:
        """Extra blocks `sequence` needs to hold the KV of its next `num_new_tokens` tokens (after `prefix`, the
        cached blocks it is about to take, when it has none yet)."""
        computed = sequence.num_computed_tokens + len(prefix) * self.block_size
        total = blocks_for(computed + num_new_tokens, self.block_size)
        return max(0, total - len(sequence.block_table) - len(prefix))

    def can_allocate(self, sequence: Sequence, num_new_tokens: int, prefix: tuple[int, ...] = ()) -> bool:
        taken_from_free = sum(1 for block in prefix if self.reference_counts[block] == 0)
        return self.blocks_needed(sequence, num_new_tokens, prefix) + taken_from_free <= self.num_free_blocks

    def allocate(self, sequence: Sequence, num_new_tokens: int, prefix: tuple[int, ...] = ()) -> None:
        """Grow `sequence`'s block table to cover its next `num_new_tokens` tokens, first taking the cached
        `prefix` (from `cached_prefix`) when it is being admitted."""
        assert self.can_allocate(sequence, num_new_tokens, prefix), "allocate called without can_allocate"
        needed = self.blocks_needed(sequence, num_new_tokens, prefix)
        if not sequence.block_table:
            self._take_prefix(sequence, prefix)
        for _ in range(needed):
            block, _ = self.free_queue.popitem(last=False)
            self._evict(block)
            self.reference_counts[block] = 1
            sequence.block_table.append(block)
        self._cache_full_blocks(sequence, sequence.num_computed_tokens + num_new_tokens)

    def _take_prefix(self, sequence: Sequence, prefix: tuple[int, ...]) -> None:
        """Share the cached `prefix` with a sequence holding no blocks; its computation resumes after it."""
        assert sequence.num_computed_tokens == 0
        for block in prefix:
            if self.reference_counts[block] == 0:
                del self.free_queue[block]
            self.reference_counts[block] += 1
        sequence.block_table = list(prefix)
        sequence.num_computed_tokens = len(prefix) * self.block_size
        if self.enable_caching and self.listener is not None:
            self.listener.prefix_cache_queried(sequence.num_tokens, sequence.num_computed_tokens)

    def _cache_full_blocks(self, sequence: Sequence, num_tokens: int) -> None:
        """Key every block that `sequence`'s first `num_tokens` tokens fill, so later requests can reuse it. A
        block whose key another block already holds stays private (and returns to the free queue unkeyed). Draft
        tokens are never keyed: only verified tokens are known to belong to the sequence."""
        if not self.enable_caching:
            return
        for index in range(len(sequence.block_digests), min(num_tokens, sequence.num_tokens) // self.block_size):
            parent_digest = sequence.block_digests[-1] if sequence.block_digests else b""
            key = self.block_key(sequence, index, parent_digest)
            block = sequence.block_table[index]
            if self.cached.setdefault(key, block) == block:
                self.block_keys[block] = key
            sequence.block_digests.append(key.digest())

    def rollback(self, sequence: Sequence) -> None:
        """After speculative verification: free the blocks past `sequence`'s computed tokens (they held rejected
        drafts' KV) and key the full blocks its accepted drafts completed."""
        keep = blocks_for(sequence.num_computed_tokens, self.block_size)
        self._release(sequence.block_table[keep:])
        del sequence.block_table[keep:]
        self._cache_full_blocks(sequence, sequence.num_computed_tokens)

    def forget_uncomputed(self, sequence: Sequence) -> set[int]:
        """Drop the prefix-cache keys of `sequence`'s blocks past its computed tokens (keyed when allocated, but
        their KV may never have been written, as when the step computing them failed); return those blocks."""
        first = sequence.num_computed_tokens // self.block_size
        blocks = set(sequence.block_table[first:])
        for block in blocks:
            key = self.block_keys[block]
            if key is not None:
                del self.cached[key]
                self.block_keys[block] = None
        del sequence.block_digests[first:]
        return blocks

    def _evict(self, block: int) -> None:
        """Forget what a free block caches, as it is handed out to be overwritten."""
        key = self.block_keys[block]
        if key is not None:
            del self.cached[key]
            self.block_keys[block] = None
            if self.listener is not None:
                self.listener.prefix_cache_evicted()

    def free(self, sequence: Sequence) -> None:
        """Release every block of `sequence`. A block nobody else holds goes to the free queue: to its tail if
        it is cached (the most recently used), to its head if not (nothing is lost by reusing it first). Blocks
        go last block first, so a prefix's tail is evicted before the blocks that lead to it."""
        self._release(sequence.block_table)
        sequence.block_table = []
        sequence.block_digests = []
        sequence.num_computed_tokens = 0

    def _release(self, blocks: list[int]) -> None:
        for block in reversed(blocks):
            self.reference_counts[block] -= 1
            assert self.reference_counts[block] >= 0
            if self.reference_counts[block] == 0:
                self.free_queue[block] = None
                if self.block_keys[block] is None:
                    self.free_queue.move_to_end(block, last=False)
