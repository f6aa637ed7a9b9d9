"""One request's state as it moves through the engine."""
import time
from dataclasses import dataclass, field
from enum import Enum, auto

import torch
from llguidance import LLMatcher

from loraserve.adapters.records import AdapterRef
from loraserve.engine.outputs import TokenLogprob
from loraserve.engine.sampling_params import SamplingParams


# What `tokens_between` gives for a virtual token (a prompt-learning adapter's, before the prompt): it keys prefix-cache
# blocks with the adapter version, which says what the virtual tokens are; the model never reads it as an id.
VIRTUAL_TOKEN = -1


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass
class DetokenizerState:
    """Offsets of incremental detokenization: text is decoded from `prefix_offset` to spare re-decoding it all."""

    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""  # all output text decoded so far
    sent_length: int = 0  # how much of `text` has been reported to the caller


@dataclass
class Sequence:
    """A request: its tokens (prompt then output), how many have KV in the cache, and its cache blocks.

    Prefill and decode are one thing: each step computes some of the tokens not yet in the cache; when the
    cache holds them all, the last position's logits give the next token. A prompt-learning adapter's virtual
    tokens come first: positions (`num_tokens`, `num_computed_tokens`, the block table) count them, `token_ids`
    and `num_prompt_tokens` do not.
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    generator: torch.Generator
    adapter: AdapterRef | None = None
    adapter_slot: int = -1  # the adapter's slot while this request holds one
    num_virtual_tokens: int = 0  # positions before the prompt that its prompt-learning adapter fills
    virtual_kv_given: bool = False  # prefix tuning: their KV is the adapter's, written rather than computed
    # Positions [start, end) whose given KV the next step writes into this request's blocks, set on admission.
    pending_virtual_kv: tuple[int, int] | None = None
    overtaken_steps: int = 0  # steps in which later requests were admitted while it waited for its adapter
    arrival_time: float = field(default_factory=time.monotonic)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache when first admitted
    block_table: list[int] = field(default_factory=list)
    block_digests: list[bytes] = field(default_factory=list)  # prefix-cache chain of the leading full blocks
    # Speculative decoding: tokens proposed for this step, verified by the target model before they count, and
    # the proposer's distribution over each ([num_drafts, vocab]; None when drafts were picked deterministically).
    draft_token_ids: list[int] = field(default_factory=list)
    draft_probabilities: torch.Tensor | None = None
    # For a proposer that guesses from the target's hidden states (Medusa): the final hidden state at the position
    # whose logits gave the last token, and the token count it was kept at (stale once tokens were added without it).
    hidden_state: torch.Tensor | None = None
    hidden_state_length: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    detokenizer: DetokenizerState = field(default_factory=DetokenizerState)
    # When its params ask: each prompt token's logprob so far (the first token has none), scored as prefill
    # chunks compute the positions before them; kept across preemption, so a recomputed prompt is not scored twice.
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    grammar_matcher: LLMatcher | None = None  # with a grammar: its parser's state after the output so far
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def scoring_prompt(self) -> bool:
        """Whether prompt tokens remain to be scored: their positions must be computed, not taken from the prefix
        cache."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        """Positions: the virtual tokens, the prompt and the output so far."""
        return self.num_virtual_tokens + len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens the next step must compute to catch up, draft tokens included."""
        return self.num_tokens + len(self.draft_token_ids) - self.num_computed_tokens

    def tokens_between(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end) (VIRTUAL_TOKEN for virtual ones), reading on into the draft tokens
        past the verified ones."""
        virtual = [VIRTUAL_TOKEN] * max(0, min(end, self.num_virtual_tokens) - start)
        start, end = max(0, start - self.num_virtual_tokens), max(0, end - self.num_virtual_tokens)
        verified = len(self.token_ids)
        return virtual + self.token_ids[start:end] + self.draft_token_ids[max(0, start - verified):
                                                                          max(0, end - verified)]

    def truncate_drafts(self, count: int = 0) -> None:
        """Keep only the first `count` draft tokens."""
        del self.draft_token_ids[count:]
        if self.draft_probabilities is not None:
            self.draft_probabilities = self.draft_probabilities[:count] if count else None

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
