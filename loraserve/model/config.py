"""The decoder's shape, read once from a checkpoint and passed to every layer."""
from dataclasses import dataclass
from typing import Any

from loraserve.model.errors import ModelLoadError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    """Everything the Llama decoder needs to know about its sizes, rope and special tokens."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # Hugging Face format with a "rope_type" key; None for plain rope
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: list[int]

    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> "ModelConfig":
        """Read a Hugging Face `config.json`, refusing anything the Llama decoder would run wrongly."""
        check_llama_architecture(hf_config)
        num_heads = hf_config["num_attention_heads"]
        rope_theta, rope_scaling = read_rope(hf_config)
        return cls(
            vocab_size=hf_config["vocab_size"],
            hidden_size=hf_config["hidden_size"],
            intermediate_size=hf_config["intermediate_size"],
            num_hidden_layers=hf_config["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=hf_config.get("num_key_value_heads") or num_heads,
            head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // num_heads,
            rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=hf_config.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf_config.get("tie_word_embeddings", False),
            bos_token_id=hf_config.get("bos_token_id"),
            eos_token_ids=token_id_list(hf_config.get("eos_token_id")),
        )


def check_llama_architecture(hf_config: dict[str, Any]) -> None:
    """Biases and other activations are real Llama variants we do not implement: refuse them by name."""
    model_type = hf_config.get("model_type")
    if model_type != "llama":
        raise ModelLoadError(f"model_type {model_type!r} is not supported; only 'llama' models are")
    for flag in ("attention_bias", "mlp_bias"):
        if hf_config.get(flag):
            raise ModelLoadError(f"{flag}=true is not supported")
    activation = hf_config.get("hidden_act", "silu")
    if activation != "silu":
        raise ModelLoadError(f"hidden_act {activation!r} is not supported; only 'silu' is")


def read_rope(hf_config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either transformers 5's `rope_parameters` or the older `rope_theta`/`rope_scaling`."""
    parameters = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    theta = parameters.pop("rope_theta", hf_config.get("rope_theta", 10000.0))
    rope_type = parameters.pop("rope_type", parameters.pop("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(f"rope type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    if rope_type == "default":
        return float(theta), None
    return float(theta), {"rope_type": rope_type, **parameters}


def token_id_list(token_ids: int | list[int] | None) -> list[int]:
    """HF configs give one id, a list of ids, or nothing."""
    if token_ids is None:
        return []
    return [token_ids] if isinstance(token_ids, int) else list(token_ids)
