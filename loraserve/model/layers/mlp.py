"""The gated feed-forward block, with gate and up projections fused into one matmul."""
import torch
from torch import nn

from loraserve.kernels.fused import silu_and_mul
from loraserve.model.layers.lora import LayerLora, project
from loraserve.model.layers.quantized_linear import linear_layer


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)); `gate_up_proj` holds the gate rows first, then the up rows."""

    def __init__(self, hidden_size: int, intermediate_size: int, weight_bits: int | None = None) -> None:
        super().__init__()
        self.gate_up_proj = linear_layer(hidden_size, 2 * intermediate_size, weight_bits)
        self.down_proj = linear_layer(intermediate_size, hidden_size, weight_bits)

    def forward(self, hidden: torch.Tensor, lora: LayerLora | None = None) -> torch.Tensor:
        return project(self.down_proj, silu_and_mul(project(self.gate_up_proj, hidden, lora, "gate_up_proj")), lora,
                       "down_proj")
