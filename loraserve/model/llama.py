"""The Llama decoder over a flat batch of tokens from many sequences, attending through the paged KV cache."""
import torch
import torch.nn.functional as F
from torch import nn

from loraserve.kernels.attention import AttentionMetadata
from loraserve.kernels.lora import LoraMapping, LoraWeights
from loraserve.model.config import ModelConfig
from loraserve.model.layers.attention import Attention
from loraserve.model.layers.lora import LayerLora
from loraserve.model.layers.mlp import MLP
from loraserve.model.layers.quantized_linear import QuantizedLinear
from loraserve.model.layers.rmsnorm import RMSNorm
from loraserve.model.layers.rotary import RotaryEmbedding


class DecoderLayer(nn.Module):
    """Pre-norm attention then pre-norm MLP, each added back to the residual stream."""

    def __init__(self, config: ModelConfig, weight_bits: int | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(
            config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim, weight_bits
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, weight_bits)

    def forward(
        self,
        hidden: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
        lora: LayerLora | None = None,
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), rope, kv_cache, metadata, lora)
        return hidden + self.mlp(self.post_attention_layernorm(hidden), lora)


class LlamaModel(nn.Module):
    """Token ids in, final-norm hidden states out; `compute_logits` is separate so callers project only the
    rows they sample from. Parameter names follow Hugging Face's, minus the "model." prefix. With `weight_bits`
    the layers' projections are weight-only quantized, and `quantize_head` adds an int8 copy of the head for
    decodes; embeddings and norms stay in float."""

    def __init__(self, config: ModelConfig, weight_bits: int | None = None) -> None:
        super().__init__()
        self.config, self.weight_bits = config, weight_bits
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        self.layers = nn.ModuleList(DecoderLayer(config, weight_bits) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.quantized_head: QuantizedLinear | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        metadata: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        lora_weights: list[dict[str, LoraWeights]] | None = None,
        lora_mapping: LoraMapping | None = None,
        input_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """input_ids, positions [num_tokens] -> hidden [num_tokens, hidden_size]. One KV-cache pair and one set
        of adapter slots per layer; `lora_mapping` says which tokens use which slot. `input_embeddings`, (rows,
        embeddings), replaces those rows' token embeddings (a prompt-tuning adapter's virtual tokens)."""
        hidden = self.embed_tokens(input_ids)
        if input_embeddings is not None:
            rows, embeddings = input_embeddings
            hidden = hidden.index_copy(0, rows, embeddings.to(hidden.dtype))
        rope = self.rotary(positions)
        use_lora = lora_weights is not None and lora_mapping is not None and not lora_mapping.empty
        for index, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            lora = LayerLora(lora_weights[index], lora_mapping) if use_lora else None
            hidden = layer(hidden, rope, kv_cache, metadata, lora)
        return self.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden_size] -> float32 logits [N, vocab_size], through the tied embedding if there is no head."""
        if self.quantized_head is not None:
            return self.quantized_head(hidden).float()
        return F.linear(hidden, self.head_weight).float()

    def projection(self, layer: int, name: str) -> nn.Module:
        """A layer's fused projection: qkv_proj, o_proj, gate_up_proj or down_proj."""
        decoder = self.layers[layer]
        return getattr(decoder.self_attn if name in ("qkv_proj", "o_proj") else decoder.mlp, name)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def quantize_head(self) -> None:
        """Read the head as int8 (a scale per 32 inputs): a weight-only quantized model's decode step otherwise
        spends a third of its time reading the head in float (49152 x 576 for SmolLM2)."""
        self.quantized_head = QuantizedLinear.from_weight(self.head_weight.detach(), 8)
