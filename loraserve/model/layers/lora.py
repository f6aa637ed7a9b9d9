"""Projections that add each token's own LoRA delta: y = x W^T + s_i (x A_i^T) B_i^T for adapter slot i."""
from dataclasses import dataclass

import torch
from torch import nn

from loraserve.kernels.lora import LoraMapping, LoraWeights, add_lora, scale_columns


@dataclass
class LayerLora:
    """One layer's adapter slots (owned by the registry, keyed by projection name) and, for this step, which
    tokens use which slot."""

    weights: dict[str, LoraWeights]
    mapping: LoraMapping


def project(linear: nn.Linear, x: torch.Tensor, lora: LayerLora | None, name: str) -> torch.Tensor:
    """The base projection, plus the adapter deltas when some token in the batch has an adapter (scaled column by
    column for DoRA adapters)."""
    output = linear(x)
    if lora is not None:
        add_lora(output, x, lora.weights[name], lora.mapping)
        scale_columns(output, lora.weights[name], lora.mapping)
    return output
