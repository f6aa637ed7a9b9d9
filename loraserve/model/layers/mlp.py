"""The gated feed-forward block, with gate and up projections fused into one matmul."""
import torch
import torch.nn.functional as F
from torch import nn

from loraserve.model.layers.lora import LayerLora, project


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)); `gate_up_proj` holds the gate rows first, then the up rows."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor, lora: LayerLora | None = None) -> torch.Tensor:
        gate, up = project(self.gate_up_proj, hidden, lora, "gate_up_proj").chunk(2, dim=-1)
        return project(self.down_proj, F.silu(gate) * up, lora, "down_proj")
