"""What a checkpoint reader hands over, and streaming its tensors into the model's fused parameters."""
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from loraserve.model.config import ModelConfig
from loraserve.model.errors import ModelLoadError
from loraserve.model.llama import LlamaModel
from loraserve.model.tokenizer import Tokenizer


@dataclass
class Checkpoint:
    """A parsed model source; `tensors` is lazy, so each weight is read (or dequantized) only when copied."""

    config: ModelConfig
    tokenizer: Tokenizer
    tensors: Iterable[tuple[str, torch.Tensor]]  # Hugging Face names without "model.", unfused q/k/v, gate/up
    num_tensors: int


def fused_destinations(config: ModelConfig) -> dict[str, tuple[str, int]]:
    """Where each separately stored projection lands: (fused module name, first row)."""
    query_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    return {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", query_rows),
        "v_proj": ("qkv_proj", query_rows + kv_rows),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", config.intermediate_size),
    }


def load_weights(model: LlamaModel, tensors: Iterable[tuple[str, torch.Tensor]], num_tensors: int) -> None:
    """Copy every tensor into its parameter (or its rows of a fused one); every parameter must end up whole."""
    parameters = dict(model.named_parameters())
    destinations = fused_destinations(model.config)
    filled = dict.fromkeys(parameters, 0)
    progress = tqdm(tensors, total=num_tensors, desc="Loading weights", unit="tensor", file=sys.stderr)
    with torch.no_grad():
        for name, tensor in progress:
            target, first_row = destination(name, destinations)
            if target not in parameters:
                raise ModelLoadError(f"checkpoint tensor {name!r} has no place in the model")
            rows = parameters[target][first_row : first_row + tensor.shape[0]]
            if rows.shape != tensor.shape:
                raise ModelLoadError(f"{name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(rows.shape)}")
            rows.copy_(tensor)
            filled[target] += tensor.numel()
    incomplete = [name for name, parameter in parameters.items() if filled[name] != parameter.numel()]
    if incomplete:
        raise ModelLoadError(f"checkpoint is missing (or repeats) weights for: {', '.join(incomplete)}")


def destination(name: str, destinations: dict[str, tuple[str, int]]) -> tuple[str, int]:
    """Maps "layers.3.self_attn.k_proj.weight" to ("layers.3.self_attn.qkv_proj.weight", first row of k)."""
    *module_path, projection, kind = name.split(".")
    if projection not in destinations:
        return name, 0
    fused, first_row = destinations[projection]
    return ".".join([*module_path, fused, kind]), first_row
