"""Read a llama-architecture GGUF file: config from metadata, weights (Q4_0/Q4_1/Q8_0 matrices kept as codes and
scales, the rest dequantized to float32), tokenizer rebuilt."""
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize

from loraserve.model.config import ModelConfig
from loraserve.model.errors import ModelLoadError
from loraserve.model.gguf_tokenizer import read_gguf_tokenizer
from loraserve.model.quantization import QuantizedTensor, decode_gguf_q4, decode_gguf_q8
from loraserve.model.weights import Checkpoint

# llama.cpp tensor names -> Hugging Face names (layer parts under "blk.N." map to "layers.N.").
GGUF_NAMES = {
    "token_embd": "embed_tokens",
    "output_norm": "norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
FOUR_BIT_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)


def read_gguf(path: Path) -> Checkpoint:
    """Parse metadata now; tensors are dequantized lazily, one at a time, as they are loaded."""
    reader = GGUFReader(path)
    metadata = {name: field.contents() for name, field in reader.fields.items()}
    tensor_names = {tensor.name for tensor in reader.tensors}
    config = gguf_config(metadata, tensor_names)
    tokenizer = read_gguf_tokenizer(metadata, config.eos_token_ids)
    return Checkpoint(config, tokenizer, stream_tensors(reader.tensors, config), len(reader.tensors),
                      stored_weight_bits(reader.tensors))


def gguf_config(metadata: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    """ModelConfig from `llama.*` keys; features we would run wrongly are refused by name."""
    architecture = metadata.get("general.architecture")
    if architecture != "llama":
        raise ModelLoadError(f"GGUF architecture {architecture!r} is not supported; only 'llama' is")
    if metadata.get("llama.expert_count", 0):
        raise ModelLoadError("mixture-of-experts GGUF models are not supported")
    if "rope_freqs.weight" in tensor_names:
        raise ModelLoadError("GGUF rope frequency factors (rope_freqs.weight, Llama 3.1 style) are not supported")
    hidden_size, num_heads = metadata["llama.embedding_length"], metadata["llama.attention.head_count"]
    head_dim = metadata.get("llama.attention.key_length", hidden_size // num_heads)
    if metadata.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise ModelLoadError("partial rotary embeddings (rope.dimension_count < head_dim) are not supported")
    stop_keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
    eos_token_ids = [metadata[key] for key in stop_keys if key in metadata]
    return ModelConfig(
        vocab_size=metadata.get("llama.vocab_size", len(metadata["tokenizer.ggml.tokens"])),
        hidden_size=hidden_size,
        intermediate_size=metadata["llama.feed_forward_length"],
        num_hidden_layers=metadata["llama.block_count"],
        num_attention_heads=num_heads,
        num_key_value_heads=metadata.get("llama.attention.head_count_kv", num_heads),
        head_dim=head_dim,
        rms_norm_eps=metadata["llama.attention.layer_norm_rms_epsilon"],
        rope_theta=metadata.get("llama.rope.freq_base", 10000.0),
        rope_scaling=gguf_rope_scaling(metadata),
        max_position_embeddings=metadata["llama.context_length"],
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=list(dict.fromkeys(eos_token_ids)),
    )


def gguf_rope_scaling(metadata: dict[str, Any]) -> dict[str, Any] | None:
    scaling_type = metadata.get("llama.rope.scaling.type", "none")
    if scaling_type == "none":
        return None
    if scaling_type == "linear":
        return {"rope_type": "linear", "factor": metadata["llama.rope.scaling.factor"]}
    raise ModelLoadError(f"GGUF rope scaling {scaling_type!r} is not supported; supported: none, linear")


def stored_weight_bits(tensors: list[ReaderTensor]) -> int | None:
    """4 when every layer matrix is Q4_0 or Q4_1, 8 when every one is Q8_0 (served as they are by the quantized
    kernel), else None."""
    types = {tensor.tensor_type for tensor in tensors if tensor.name.startswith("blk.") and len(tensor.shape) == 2}
    if types and types <= set(FOUR_BIT_TYPES):
        return 4
    return 8 if types == {GGMLQuantizationType.Q8_0} else None


def stream_tensors(tensors: list[ReaderTensor],
                   config: ModelConfig) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    """Yield (Hugging Face name, weight) with Q/K rows put back in rotate-half order: Q4_0, Q4_1 and Q8_0 matrices
    as their codes and scales, everything else as float32."""
    rope_heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for tensor in tensors:
        name = hf_name(tensor.name)
        weight = read_tensor(tensor)
        projection = name.split(".")[-2]
        if projection in rope_heads:
            weight = weight[rope_row_order(weight.shape[0], rope_heads[projection])]
        yield name, weight


def read_tensor(tensor: ReaderTensor) -> torch.Tensor | QuantizedTensor:
    shape = [int(size) for size in reversed(tensor.shape)]  # GGUF lists dims innermost first
    if tensor.tensor_type in FOUR_BIT_TYPES and len(shape) == 2:
        return decode_gguf_q4(tensor.data, shape[0], with_minimum=tensor.tensor_type == GGMLQuantizationType.Q4_1)
    if tensor.tensor_type == GGMLQuantizationType.Q8_0 and len(shape) == 2:
        return decode_gguf_q8(tensor.data, shape[0])
    weight = torch.from_numpy(np.require(dequantize(tensor.data, tensor.tensor_type), requirements="W"))
    return weight.reshape(shape)


def hf_name(gguf_name: str) -> str:
    """Maps "blk.4.attn_q.weight" to "layers.4.self_attn.q_proj.weight"."""
    parts = gguf_name.split(".")
    prefix = ""
    if parts[0] == "blk":
        prefix, parts = f"layers.{parts[1]}.", parts[2:]
    module, kind = ".".join(parts[:-1]), parts[-1]
    if module not in GGUF_NAMES:
        raise ModelLoadError(f"GGUF tensor {gguf_name!r} is not part of a llama model")
    return f"{prefix}{GGUF_NAMES[module]}.{kind}"


def rope_row_order(rows: int, num_heads: int) -> torch.Tensor:
    """llama.cpp's converter interleaves each head's output rows (x0, x_half, x1, x_half+1, ...) for its
    adjacent-pair rope; our rotate-half rope wants the first half of the head's rows, then the second. Returns
    which stored row goes to each place."""
    pairs = rows // num_heads // 2
    return torch.arange(rows).reshape(num_heads, pairs, 2).transpose(1, 2).reshape(rows)
