"""How one request wants its tokens chosen and when it wants to stop."""
from dataclasses import dataclass, field

from loraserve.engine.grammar import GrammarSpec

# Below this a temperature divides logits into infinities; as in vLLM, such a request is greedy.
GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """Per-request sampling settings; the API layer validates ranges before building one."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 (or anything below GREEDY_TEMPERATURE) means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF-style: over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI-style: over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the chosen token's logprob plus the k most likely
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's logprob (the first has none) plus the
    # k most likely at its position; with max_tokens 0 the request only scores its prompt
    speculative: bool = True  # let the server's speculative decoding (if configured) propose tokens for it
    grammar: GrammarSpec | None = None  # structured output: what the generated text must match

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE
