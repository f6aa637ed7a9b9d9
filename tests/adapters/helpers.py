"""Tiny random Llama LoRA adapters, made and saved by PEFT itself, and readers of what PEFT saved."""
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from loraserve.adapters.adapter_info import BaseModelShape
from loraserve.adapters.records import AdapterRef
from loraserve.adapters.registry import AdapterRegistry
from loraserve.adapters.slot_pool import SlotPool

BASE = BaseModelShape.for_llama(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                                head_dim=16, vocab_size=320)
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
MAX_RANK = 8  # of the registries the tests make (`make_registry`)
MakeRegistry = Callable[..., tuple[AdapterRegistry, SlotPool]]
MakeAdapter = Callable[..., Path]


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def save_peft_prompt_learning(directory: Path, peft_type: str, num_virtual_tokens: int = 5, seed: int = 0,
                              **options: Any) -> Path:
    """A PEFT prompt-tuning or prefix-tuning adapter of the tiny random Llama (BASE)."""
    config_class = {"PROMPT_TUNING": PromptTuningConfig, "PREFIX_TUNING": PrefixTuningConfig}[peft_type]
    model = get_peft_model(tiny_llama(seed), config_class(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
                                                          **options))
    model.save_pretrained(directory)
    return directory


def make_peft_model(seed: int = 0, rank: int = 4, alpha: float = 8, targets: Any = ("q_proj", "v_proj"),
                    **options: Any) -> PeftModel:
    """init_lora_weights=False makes B random too, so every adapter changes the output."""
    base = tiny_llama(seed)
    target_modules = targets if isinstance(targets, str) else list(targets)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, init_lora_weights=False, **options)
    return get_peft_model(base, config)


def save_peft_adapter(directory: Path, **settings: Any) -> Path:
    make_peft_model(**settings).save_pretrained(directory)
    return directory


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / WEIGHTS)


def write_tensors(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, directory / WEIGHTS, metadata={"format": "pt"})


def edit_config(directory: Path, **changes: Any) -> None:
    path = directory / CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def tensor_name(layer: int, target: str, matrix: str) -> str:
    parent = "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"base_model.model.model.layers.{layer}.{parent}.{target}.lora_{matrix}.weight"


def acquire(registry: AdapterRegistry, ref: AdapterRef) -> int | None:
    """What the engine gets once the loader has done its part: the version made resident and its slot held (None
    while every slot is held). Calls `hold` only when resident, so no loader thread starts behind the test."""
    return registry.hold(ref) if registry.make_resident(ref) else None


class EventLog:
    """A registry listener that records loads and evictions by tier."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def adapter_loaded(self, tier: str, seconds: float) -> None:
        assert seconds >= 0
        self.events.append(("loaded", tier))

    def adapter_evicted(self, tier: str) -> None:
        self.events.append(("evicted", tier))


def slot_q_a(pool: SlotPool, slot: int) -> torch.Tensor:
    """Layer 0's q_proj A as written in the slot's pages (rank 4 rows); zero once the slot is freed."""
    return pool.layer_weights[0]["qkv_proj"].lora_a[pool.slot_pages[slot, :4], 0]


def peft_q_a(directory: Path) -> torch.Tensor:
    return read_tensors(directory)[tensor_name(0, "q_proj", "A")]
