"""What the engine reports back to the caller of a request after each step."""
from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """Log-probability of a generated token, with the most likely alternatives at its position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), most likely first
    rank: int = 1  # prompt scores: 1 + how many tokens the model found more likely


@dataclass
class RequestOutput:
    """The new tokens of one request since its last output; `finished` marks the final one."""

    request_id: str
    token_ids: list[int]
    text: str  # the text delta these tokens add (stop strings already cut off)
    logprobs: list[TokenLogprob]
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort" or "error" once finished
    stop_reason: str | int | None  # the stop string or stop/EOS token id that ended it, when "stop"
    num_prompt_tokens: int
    num_output_tokens: int  # total so far
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    error: Exception | None = None  # why the engine ended it, when finish_reason is "error"
    # In a request's first output, when it asked (`prompt_logprobs`): one per prompt token, None for the first.
    prompt_logprobs: list[TokenLogprob | None] | None = None
