"""What callers hold of an adapter version (a reference, pinned while a request uses it) and what the registry
reports of one."""
from dataclasses import dataclass


@dataclass(frozen=True)
class AdapterRef:
    name: str
    version: int


@dataclass(frozen=True)
class AdapterRecord:
    name: str
    version: int
    rank: int
    alpha: float
    targets: list[str]
    size_bytes: int
    tier: str  # the highest it sits in: "disk", "cpu" or "gpu"
    requests_served: int  # since this process started
    created_at: float
    kind: str  # adapter_info.LORA, PROMPT_TUNING or PREFIX_TUNING
    num_virtual_tokens: int
    num_medusa_heads: int  # the adapter's own Medusa heads (0: its requests use the base model's, if any)
