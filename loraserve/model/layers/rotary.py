"""Rotary position embedding in the Hugging Face "rotate half" layout, with a cos/sin table per position."""
import math
from typing import Any

import torch
from torch import nn


def inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """One rotation speed per pair of channels [head_dim // 2], float32, after the checkpoint's scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    frequencies = 1.0 / (theta**exponents)
    rope_type = scaling["rope_type"] if scaling else "default"
    if rope_type == "linear":
        return frequencies / scaling["factor"]
    if rope_type == "llama3":
        return llama3_frequencies(frequencies, scaling)
    assert rope_type == "default", rope_type
    return frequencies


def llama3_frequencies(frequencies: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's context extension: slow rotations are divided by `factor`, fast ones kept, the band between
    blended smoothly by where its wavelength sits relative to the original context."""
    factor = scaling["factor"]
    low_factor, high_factor = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original_context = scaling["original_max_position_embeddings"]
    wavelengths = 2 * math.pi / frequencies
    slow = wavelengths > original_context / low_factor
    fast = wavelengths < original_context / high_factor
    divided = torch.where(slow, frequencies / factor, frequencies)
    blend = (original_context / wavelengths - low_factor) / (high_factor - low_factor)
    blended = (1 - blend) * divided / factor + blend * divided
    return torch.where(~slow & ~fast, blended, divided)


class RotaryEmbedding(nn.Module):
    """Holds cos/sin of every position's angles; a step looks its tokens' rows up by position."""

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict[str, Any] | None) -> None:
        super().__init__()
        frequencies = inverse_frequencies(head_dim, theta, scaling)
        angles = torch.arange(max_position, dtype=torch.float32)[:, None] * frequencies[None, :]
        # Kept in float32 whatever the model dtype; cast at use, as the reference does.
        self.register_buffer("cos_sin", torch.cat([angles.cos(), angles.sin()], dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [num_tokens, 1, head_dim // 2], broadcasting over heads."""
        cos, sin = self.cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
        return cos.contiguous(), sin.contiguous()  # once a step, for every layer's fused rotary
