"""What every adapter kind is described by, and the base model shape it is checked against."""
import dataclasses
import math
from dataclasses import dataclass

from loraserve.adapters.lora_config import TARGETS
from loraserve.adapters.medusa_format import MedusaWeights

# The kinds served, by the name the API lists (PEFT's peft_type, lower-cased).
LORA, PROMPT_TUNING, PREFIX_TUNING = "lora", "prompt_tuning", "prefix_tuning"


@dataclass(frozen=True)
class BaseModelShape:
    """What an adapter must fit: the layer count and each target's (in_features, out_features)."""

    num_layers: int
    module_shapes: dict[str, tuple[int, int]]
    vocab_size: int  # what Medusa heads with their own projections must project to

    def __post_init__(self) -> None:
        assert set(self.module_shapes) == set(TARGETS), f"need shapes for exactly {list(TARGETS)}"

    @classmethod
    def for_llama(cls, num_layers: int, hidden_size: int, intermediate_size: int, num_heads: int,
                  num_kv_heads: int, head_dim: int, vocab_size: int) -> "BaseModelShape":
        return cls(num_layers, {
            "q_proj": (hidden_size, num_heads * head_dim), "k_proj": (hidden_size, num_kv_heads * head_dim),
            "v_proj": (hidden_size, num_kv_heads * head_dim), "o_proj": (num_heads * head_dim, hidden_size),
            "gate_proj": (hidden_size, intermediate_size), "up_proj": (hidden_size, intermediate_size),
            "down_proj": (intermediate_size, hidden_size),
        }, vocab_size)

    @property
    def hidden_size(self) -> int:
        return self.module_shapes["q_proj"][0]

    @property
    def kv_width(self) -> int:
        """Features of one token's keys (or values) in one layer: key/value heads times head size."""
        return self.module_shapes["k_proj"][1]


@dataclass(frozen=True)
class AdapterInfo:
    """A validated adapter without its weights: what the registry lists for adapters still on disk. The LoRA
    fields are zero for the prompt-learning kinds, which instead put virtual tokens before the prompt."""

    rank: int  # the largest module's (the pages it takes)
    alpha: float
    use_rslora: bool
    targets: list[str]  # in TARGETS order
    size_bytes: int  # of the float32 weights once loaded
    use_dora: bool = dataclasses.field(default=False, kw_only=True)
    kind: str = dataclasses.field(default=LORA, kw_only=True)
    num_virtual_tokens: int = dataclasses.field(default=0, kw_only=True)  # positions it takes before the prompt
    num_medusa_heads: int = dataclasses.field(default=0, kw_only=True)  # its own Medusa heads, if it brought some
    medusa_bytes: int = dataclasses.field(default=0, kw_only=True)  # theirs in float32 (counted in size_bytes too)

    @property
    def num_pages(self) -> int:
        """Pool pages it takes: one per LoRA rank component, and with DoRA one more for its column scales. The
        prompt-learning kinds take none: their few rows sit beside the pool, one set per slot."""
        return self.rank + self.use_dora

    @property
    def scale(self) -> float:
        """The scale of a module no rank or alpha pattern names."""
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank

    def info(self) -> "AdapterInfo":
        """The description alone, to keep after the weights are dropped."""
        return AdapterInfo(self.rank, self.alpha, self.use_rslora, self.targets, self.size_bytes,
                           use_dora=self.use_dora, kind=self.kind, num_virtual_tokens=self.num_virtual_tokens,
                           num_medusa_heads=self.num_medusa_heads, medusa_bytes=self.medusa_bytes)


@dataclass(frozen=True)
class LoadedAdapter(AdapterInfo):
    """An adapter with its weights on the CPU: each kind adds its own; any kind may bring its own Medusa heads."""

    medusa_heads: MedusaWeights | None = dataclasses.field(default=None, kw_only=True)
