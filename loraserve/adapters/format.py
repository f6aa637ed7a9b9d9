"""Reads and validates a PEFT adapter (adapter_config.json + adapter_model.safetensors, and optionally its own Medusa
heads beside them, config.json + medusa_lm_head.safetensors, as LoRAX reads them) for a Llama base: the seam
between the kinds served. Its `peft_type` picks the kind (LoRA, with DoRA and rank/alpha patterns, in lora_format.py;
prompt and prefix tuning in prompt_learning.py), which checks its config and the safetensors header against the
base model before a tensor is read, so a bad upload fails fast with a message that names the problem. Kinds not
served are refused by name; pickled weights (adapter_model.bin) are refused unread, since unpickling runs
arbitrary code."""
import dataclasses
from pathlib import Path

from loraserve.adapters.adapter_info import AdapterInfo, BaseModelShape
from loraserve.adapters.config_checks import CONFIG_FILE, OPTIONAL_FILES, WEIGHTS_FILE, read_config
from loraserve.adapters.errors import AdapterFormatError, AdapterNotFoundError
from loraserve.adapters.lora_format import LoraAdapter, LoraLayout, inspect_lora, load_lora
from loraserve.adapters.medusa_format import has_medusa_heads, inspect_medusa_heads, load_medusa_heads
from loraserve.adapters.prompt_learning import (KINDS as PROMPT_LEARNING_KINDS, PromptLearningAdapter,
                                                inspect_prompt_learning, load_prompt_learning)

PICKLED_WEIGHTS_FILE = "adapter_model.bin"
SERVED_TYPES = ["LORA", *PROMPT_LEARNING_KINDS]

Adapter = LoraAdapter | PromptLearningAdapter  # a validated adapter with its weights on the CPU


def inspect_adapter(directory: Path, base: BaseModelShape, max_rank: int) -> AdapterInfo:
    """Validate config and safetensors headers without reading tensor data (cheap enough for a start-up scan)."""
    layout = _inspect(directory, base, max_rank)
    info = layout.info if isinstance(layout, LoraLayout) else layout
    return _with_medusa_heads(info, directory, base)


def load_adapter(directory: Path, base: BaseModelShape, max_rank: int) -> Adapter:
    layout = _inspect(directory, base, max_rank)
    if isinstance(layout, LoraLayout):
        adapter = load_lora(layout, directory / WEIGHTS_FILE)
    else:
        adapter = load_prompt_learning(layout, directory / WEIGHTS_FILE, base)
    if not has_medusa_heads(directory):
        return adapter
    heads = load_medusa_heads(directory, base.hidden_size, base.vocab_size)
    return dataclasses.replace(_with_medusa_heads(adapter, directory, base), medusa_heads=heads)


def _with_medusa_heads(info: AdapterInfo, directory: Path, base: BaseModelShape) -> AdapterInfo:
    """The description counting the adapter's own Medusa heads, checked from their header, if it has some."""
    if not has_medusa_heads(directory):
        return info
    num_heads, _, _, _, size_bytes = inspect_medusa_heads(directory, base.hidden_size, base.vocab_size)
    return dataclasses.replace(info, num_medusa_heads=num_heads, medusa_bytes=size_bytes,
                               size_bytes=info.size_bytes + size_bytes)


def adapter_files(directory: Path) -> list[Path]:
    """The files an adapter consists of: its two, and its Medusa heads' if it has them; refuses a missing one,
    and pickled weights without reading them."""
    if not directory.is_dir():
        raise AdapterNotFoundError(f"no adapter directory at {directory}")
    config, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config.is_file():
        raise AdapterFormatError(f"missing {CONFIG_FILE}")
    if not weights.is_file():
        if (directory / PICKLED_WEIGHTS_FILE).exists():
            raise AdapterFormatError(f"{PICKLED_WEIGHTS_FILE} holds pickled weights, which are refused (unpickling "
                                     f"runs arbitrary code); save the adapter as {WEIGHTS_FILE}")
        raise AdapterFormatError(f"missing {WEIGHTS_FILE}")
    return [config, weights] + [directory / name for name in OPTIONAL_FILES if (directory / name).is_file()]


def _inspect(directory: Path, base: BaseModelShape, max_rank: int) -> LoraLayout | AdapterInfo:
    config_path, weights_path = adapter_files(directory)[:2]
    config = read_config(config_path)
    peft_type = config.get("peft_type")
    if peft_type == "LORA":
        return inspect_lora(config, weights_path, base, max_rank)
    if peft_type in PROMPT_LEARNING_KINDS:
        return inspect_prompt_learning(config, weights_path, base)
    raise AdapterFormatError(f"peft_type is {peft_type!r}; the adapter kinds served are {', '.join(SERVED_TYPES)}")
