"""Medusa heads on disk, as FasterDecoding/Medusa and LoRAX save them: `config.json` (medusa_num_heads,
medusa_num_layers) and `medusa_lm_head.safetensors`, in which head i holds residual blocks `i.j.linear.{weight,bias}`
(j < medusa_num_layers, each x + SiLU(W x + b)) and then, in Medusa-1's layout, its own projection to the vocabulary
`i.{medusa_num_layers}.weight`; LoRAX's second layout leaves the projection out and reads the blocks' output through
the base model's head. Checked against the base model's hidden and vocabulary sizes from the header alone before a
tensor is read; safetensors only (pickled heads are refused unread, as adapters are)."""
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraserve.adapters.config_checks import MEDUSA_CONFIG_FILE, MEDUSA_WEIGHTS_FILE, is_int, read_config
from loraserve.adapters.errors import AdapterFormatError
from loraserve.adapters.safetensors_reader import check_dtype, read_finite_tensors, tensor_headers

PICKLED_MEDUSA_FILE = "medusa_lm_head.pt"
MAX_HEADS = 16  # tokens a step could guess ahead; published heads have 3 to 5
MAX_LAYERS = 8  # residual blocks per head; published heads have 1
# Some trainers save the heads as a part of the whole model, their names prefixed.
NAME_PREFIX = "medusa_head."


@dataclass(frozen=True)
class MedusaWeights:
    """Validated heads in float32 on the CPU: per head, its blocks' weights and biases stacked, and in Medusa-1's
    layout its projection to the vocabulary (None in LoRAX's: the base model's head is used)."""

    block_weights: torch.Tensor  # [heads, layers, hidden, hidden]
    block_biases: torch.Tensor  # [heads, layers, hidden]
    projections: torch.Tensor | None  # [heads, vocab, hidden]

    @property
    def num_heads(self) -> int:
        return self.block_weights.shape[0]

    def to(self, device: torch.device, dtype: torch.dtype) -> "MedusaWeights":
        """On the device, in the dtype of the hidden states the heads read."""
        return MedusaWeights(*(None if tensor is None else tensor.to(device, dtype) for tensor in
                               (self.block_weights, self.block_biases, self.projections)))


def has_medusa_heads(directory: Path) -> bool:
    """Whether a directory carries Medusa heads: their weights, or a config.json that speaks of them (so that half
    a pair is refused by name; another config.json, say a model's beside an adapter, is not theirs)."""
    if any((directory / name).exists() for name in (MEDUSA_WEIGHTS_FILE, PICKLED_MEDUSA_FILE)):
        return True
    try:
        config = json.loads((directory / MEDUSA_CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and any(key.startswith("medusa_") for key in config)


def load_medusa_heads(directory: Path, hidden_size: int, vocab_size: int) -> MedusaWeights:
    """Read and check the heads in `directory` against the base model's sizes."""
    num_heads, num_layers, names, projected, _ = inspect_medusa_heads(directory, hidden_size, vocab_size)
    tensors = read_finite_tensors(directory / MEDUSA_WEIGHTS_FILE, list(names.values()))
    weights = {key: tensors[name].float() for key, name in names.items()}
    blocks = [[(weights[(head, layer, "weight")], weights[(head, layer, "bias")]) for layer in range(num_layers)]
              for head in range(num_heads)]
    return MedusaWeights(
        block_weights=torch.stack([torch.stack([weight for weight, _ in head]) for head in blocks]),
        block_biases=torch.stack([torch.stack([bias for _, bias in head]) for head in blocks]),
        projections=torch.stack([weights[(head, num_layers, "weight")] for head in range(num_heads)])
        if projected else None)


def inspect_medusa_heads(directory: Path, hidden_size: int, vocab_size: int
                         ) -> tuple[int, int, dict[tuple[int, int, str], str], bool, int]:
    """(heads, layers, each tensor's stored name by (head, index, weight|bias), whether heads have projections,
    their bytes in float32), from the config and the safetensors header."""
    weights_path = directory / MEDUSA_WEIGHTS_FILE
    if not weights_path.is_file():
        if (directory / PICKLED_MEDUSA_FILE).exists():
            raise AdapterFormatError(f"{PICKLED_MEDUSA_FILE} holds pickled Medusa heads, which are refused "
                                     f"(unpickling runs arbitrary code); save them as {MEDUSA_WEIGHTS_FILE}")
        raise AdapterFormatError(f"Medusa heads need {MEDUSA_WEIGHTS_FILE} beside {MEDUSA_CONFIG_FILE}")
    num_heads, num_layers = _read_config(directory / MEDUSA_CONFIG_FILE)
    headers = tensor_headers(weights_path)
    prefix = NAME_PREFIX if headers and all(name.startswith(NAME_PREFIX) for name in headers) else ""
    projected = f"{prefix}0.{num_layers}.weight" in headers
    expected: dict[tuple[int, int, str], list[int]] = {}
    for head in range(num_heads):
        for layer in range(num_layers):
            expected[(head, layer, "weight")] = [hidden_size, hidden_size]
            expected[(head, layer, "bias")] = [hidden_size]
        if projected:
            expected[(head, num_layers, "weight")] = [vocab_size, hidden_size]
    names = {key: _stored_name(prefix, key, num_layers) for key in expected}
    unexpected = sorted(set(headers) - set(names.values()), key=_natural)
    if unexpected:
        raise AdapterFormatError(f"{MEDUSA_WEIGHTS_FILE} holds tensors that {num_heads} heads of {num_layers} "
                                 f"layers{' with projections' if projected else ''} do not have: {unexpected[:4]}")
    for key, shape in expected.items():
        name = names[key]
        if name not in headers:
            raise AdapterFormatError(f"{MEDUSA_WEIGHTS_FILE} lacks tensor {name!r} ({MEDUSA_CONFIG_FILE} says "
                                     f"{num_heads} heads of {num_layers} layers)")
        dtype, stored_shape = headers[name]
        check_dtype(name, dtype)
        if stored_shape != shape:
            what = "hidden size" if key[1] < num_layers else "vocabulary and hidden size"
            raise AdapterFormatError(f"tensor {name!r} has shape {stored_shape}, expected {shape} (the base "
                                     f"model's {what})")
    size_bytes = 4 * sum(math.prod(shape) for shape in expected.values())
    return num_heads, num_layers, names, projected, size_bytes


def _stored_name(prefix: str, key: tuple[int, int, str], num_layers: int) -> str:
    head, index, part = key
    return f"{prefix}{head}.{index}.{part}" if index == num_layers else f"{prefix}{head}.{index}.linear.{part}"


def _natural(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _read_config(path: Path) -> tuple[int, int]:
    if not path.exists():
        raise AdapterFormatError(f"Medusa heads need {MEDUSA_CONFIG_FILE} (medusa_num_heads, medusa_num_layers) "
                                 f"beside {MEDUSA_WEIGHTS_FILE}")
    config = read_config(path)
    num_heads, num_layers = config.get("medusa_num_heads"), config.get("medusa_num_layers", 1)
    if not is_int(num_heads) or not 1 <= num_heads <= MAX_HEADS:
        raise AdapterFormatError(f"medusa_num_heads in {MEDUSA_CONFIG_FILE} must be an integer from 1 to "
                                 f"{MAX_HEADS}, got {num_heads!r}")
    if not is_int(num_layers) or not 1 <= num_layers <= MAX_LAYERS:
        raise AdapterFormatError(f"medusa_num_layers in {MEDUSA_CONFIG_FILE} must be an integer from 1 to "
                                 f"{MAX_LAYERS}, got {num_layers!r}")
    return num_heads, num_layers
