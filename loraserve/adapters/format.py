"""Reads and validates a PEFT adapter (adapter_config.json + adapter_model.safetensors) for a Llama base: the seam
between the kinds served. Its `peft_type` picks the kind (LoRA, with DoRA and rank/alpha patterns, in lora_format.py;
prompt and prefix tuning in prompt_learning.py), which checks its config and the safetensors header against the
base model before a tensor is read, so a bad upload fails fast with a message that names the problem. Kinds not
served are refused by name; pickled weights (adapter_model.bin) are refused unread, since unpickling runs
arbitrary code."""
from pathlib import Path

from loraserve.adapters.adapter_info import AdapterInfo, BaseModelShape
from loraserve.adapters.config_checks import CONFIG_FILE, WEIGHTS_FILE, read_config
from loraserve.adapters.errors import AdapterFormatError, AdapterNotFoundError
from loraserve.adapters.lora_format import LoraAdapter, LoraLayout, inspect_lora, load_lora
from loraserve.adapters.prompt_learning import (KINDS as PROMPT_LEARNING_KINDS, PromptLearningAdapter,
                                                inspect_prompt_learning, load_prompt_learning)

PICKLED_WEIGHTS_FILE = "adapter_model.bin"
SERVED_TYPES = ["LORA", *PROMPT_LEARNING_KINDS]

Adapter = LoraAdapter | PromptLearningAdapter  # a validated adapter with its weights on the CPU


def inspect_adapter(directory: Path, base: BaseModelShape, max_rank: int) -> AdapterInfo:
    """Validate config and safetensors header without reading tensor data (cheap enough for a start-up scan)."""
    layout = _inspect(directory, base, max_rank)
    return layout.info if isinstance(layout, LoraLayout) else layout


def load_adapter(directory: Path, base: BaseModelShape, max_rank: int) -> Adapter:
    layout = _inspect(directory, base, max_rank)
    if isinstance(layout, LoraLayout):
        return load_lora(layout, directory / WEIGHTS_FILE)
    return load_prompt_learning(layout, directory / WEIGHTS_FILE, base)


def adapter_files(directory: Path) -> list[Path]:
    """The two files an adapter consists of; refuses a missing one, and pickled weights without reading them."""
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
    return [config, weights]


def _inspect(directory: Path, base: BaseModelShape, max_rank: int) -> LoraLayout | AdapterInfo:
    config_path, weights_path = adapter_files(directory)
    config = read_config(config_path)
    peft_type = config.get("peft_type")
    if peft_type == "LORA":
        return inspect_lora(config, weights_path, base, max_rank)
    if peft_type in PROMPT_LEARNING_KINDS:
        return inspect_prompt_learning(config, weights_path, base)
    raise AdapterFormatError(f"peft_type is {peft_type!r}; the adapter kinds served are {', '.join(SERVED_TYPES)}")
