"""What a checkpoint reader hands over, and streaming its tensors into the model's fused parameters."""
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from loraserve.model.config import ModelConfig
from loraserve.model.errors import ModelLoadError
from loraserve.model.layers.quantized_linear import QuantizedLinear
from loraserve.model.llama import LlamaModel
from loraserve.model.quantization import QuantizedTensor, can_quantize, quantize
from loraserve.model.tokenizer import Tokenizer


@dataclass
class Checkpoint:
    """A parsed model source; `tensors` is lazy, so each weight is read (or dequantized) only when copied."""

    config: ModelConfig
    tokenizer: Tokenizer
    # Hugging Face names without "model.", unfused q/k/v, gate/up; GGUF's four-bit matrices stay quantized
    tensors: Iterable[tuple[str, torch.Tensor | QuantizedTensor]]
    num_tensors: int
    weight_bits: int | None = None  # the bits the layers' projections are stored in, where the kernels take them


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


def load_weights(model: LlamaModel, tensors: Iterable[tuple[str, torch.Tensor | QuantizedTensor]],
                 num_tensors: int) -> None:
    """Copy every tensor into its parameter (or its rows of a fused one), in the form its layer holds: a quantized
    layer takes codes and scales (quantizing a float tensor on the way), a float one the dequantized weight. Every
    parameter and quantized buffer must end up whole."""
    quantized_layers = {name: module for name, module in model.named_modules() if isinstance(module, QuantizedLinear)}
    targets = dict(model.named_parameters())
    for layer_name, layer in quantized_layers.items():
        targets |= {f"{layer_name}.{part}": buffer for part, buffer in layer.named_buffers()}
    destinations = fused_destinations(model.config)
    filled = dict.fromkeys(targets, 0)
    progress = tqdm(tensors, total=num_tensors, desc="Loading weights", unit="tensor", file=sys.stderr)
    with torch.no_grad():
        for name, tensor in progress:
            target, first_row = destination(name, destinations)
            layer_name, _ = target.rsplit(".", 1)
            if layer_name in quantized_layers:
                parts = as_quantized(name, tensor, quantized_layers[layer_name].bits).parts()
                pieces = {f"{layer_name}.{part}": value for part, value in parts.items()}
            else:
                pieces = {target: tensor.dequantize() if isinstance(tensor, QuantizedTensor) else tensor}
            for piece_name, piece in pieces.items():
                copy_rows(name, piece, targets.get(piece_name), first_row)
                filled[piece_name] += piece.numel()
    incomplete = [name for name, target in targets.items() if filled[name] != target.numel()]
    if incomplete:
        raise ModelLoadError(f"checkpoint is missing (or repeats) weights for: {', '.join(incomplete)}")


def as_quantized(name: str, tensor: torch.Tensor | QuantizedTensor, bits: int) -> QuantizedTensor:
    """The tensor as `bits`-bit codes: kept as they are when already so, else quantized from float."""
    if isinstance(tensor, QuantizedTensor):
        if tensor.bits == bits and tensor.fits_kernel:
            return tensor
        tensor = tensor.dequantize()
    if not can_quantize(tensor.shape, bits):
        raise ModelLoadError(f"{name!r} of shape {tuple(tensor.shape)} cannot be quantized to {bits} bits")
    return quantize(tensor, bits)


def copy_rows(name: str, tensor: torch.Tensor, target: torch.Tensor | None, first_row: int) -> None:
    """Copy into rows [first_row, first_row + len) of target, which must match in shape."""
    if target is None:
        raise ModelLoadError(f"checkpoint tensor {name!r} has no place in the model")
    rows = target[first_row : first_row + tensor.shape[0]]
    if rows.shape != tensor.shape:
        raise ModelLoadError(f"{name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(rows.shape)}")
    rows.copy_(tensor)


def destination(name: str, destinations: dict[str, tuple[str, int]]) -> tuple[str, int]:
    """Maps "layers.3.self_attn.k_proj.weight" to ("layers.3.self_attn.qkv_proj.weight", first row of k)."""
    *module_path, projection, kind = name.split(".")
    if projection not in destinations:
        return name, 0
    fused, first_row = destinations[projection]
    return ".".join([*module_path, fused, kind]), first_row
