"""Checks every adapter kind's adapter_config.json shares: reading it, refusing options by name, value types."""
import json
import math
from pathlib import Path
from typing import Any

from loraserve.adapters.errors import AdapterFormatError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# An adapter's own Medusa heads, beside its PEFT files (LoRAX's layout), when it brings some.
MEDUSA_CONFIG_FILE = "config.json"
MEDUSA_WEIGHTS_FILE = "medusa_lm_head.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
OPTIONAL_FILES = (MEDUSA_CONFIG_FILE, MEDUSA_WEIGHTS_FILE)


def read_config(path: Path) -> dict[str, Any]:
    """A config file's JSON object (adapter_config.json, or Medusa heads' config.json)."""
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterFormatError(f"{path.name} is not readable JSON: {error}") from error
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path.name} must hold a JSON object")
    return config


def refuse_options(config: dict[str, Any], options: dict[str, str]) -> None:
    """Refuse, by name, the first option (of `options`, each with what it asks for) the config sets."""
    for key, feature in options.items():
        if config.get(key):
            raise AdapterFormatError(f"{CONFIG_FILE} asks for {feature} ({key}={config[key]!r}), which we do not serve")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
