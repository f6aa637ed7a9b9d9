"""Root-mean-square normalization, computed in float32 like the reference Llama."""
import torch
from torch import nn

from loraserve.kernels.fused import rms_norm


class RMSNorm(nn.Module):
    """Scales each token's vector to unit RMS, then by a learned per-channel weight."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden, self.weight, self.eps)
