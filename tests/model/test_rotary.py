"""Rope frequencies against transformers' own, at real model sizes where every scaling band is populated."""
import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from loraserve.model.config import ModelConfig
from loraserve.kernels.fused import apply_rotary
from loraserve.model.layers.rotary import RotaryEmbedding, inverse_frequencies

SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
}


def llama31_like(scaling: dict | None) -> LlamaConfig:
    return LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0, rope_scaling=scaling,
                       max_position_embeddings=131072)


@pytest.mark.parametrize("name", list(SCALINGS))
def test_inverse_frequencies_equal_transformers(name):
    hf_config = llama31_like(SCALINGS[name])
    if name == "default":
        expected, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(hf_config)
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[name](hf_config)
    config = ModelConfig.from_hf_config(hf_config.to_dict())
    ours = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    assert torch.equal(ours, expected)


def test_rotation_equals_transformers_at_large_positions():
    hf_config = llama31_like(SCALINGS["llama3"])
    hf_config.max_position_embeddings = 20000
    config = ModelConfig.from_hf_config(hf_config.to_dict())
    positions = torch.tensor([0, 1, 7, 4095, 8191, 19999])
    states = torch.randn(len(positions), 2, config.head_dim, generator=torch.Generator().manual_seed(0))
    cos, sin = LlamaRotaryEmbedding(hf_config)(states, positions[None])
    half = config.head_dim // 2
    rotated_half = torch.cat((-states[..., half:], states[..., :half]), dim=-1)
    expected = states * cos[0, :, None] + rotated_half * sin[0, :, None]
    rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling)
    assert torch.equal(apply_rotary(states, *rotary(positions)), expected)
