"""Self-attention of a flat token batch over the paged KV cache."""
import torch
from torch import nn

from loraserve.kernels.attention import AttentionMetadata, paged_attention
from loraserve.kernels.fused import rotate_and_cache
from loraserve.model.layers.lora import LayerLora, project
from loraserve.model.layers.quantized_linear import linear_layer


class Attention(nn.Module):
    """Projects q/k/v in one matmul, rotates q and k, stores k/v in the cache, attends, projects out."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 weight_bits: int | None = None) -> None:
        super().__init__()
        assert num_heads % num_kv_heads == 0, "query heads must split evenly over key/value heads"
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.query_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.scale = head_dim**-0.5
        # Rows: all query heads, then all key heads, then all value heads.
        self.qkv_proj = linear_layer(hidden_size, self.query_size + 2 * self.kv_size, weight_bits)
        self.o_proj = linear_layer(self.query_size, hidden_size, weight_bits)

    def forward(
        self,
        hidden: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
        lora: LayerLora | None = None,
    ) -> torch.Tensor:
        """hidden [num_tokens, hidden_size] -> [num_tokens, hidden_size]; writes this layer's cache slots."""
        qkv = project(self.qkv_proj, hidden, lora, "qkv_proj")
        query = rotate_and_cache(qkv, *rope, kv_cache, metadata.slot_mapping, self.num_heads)
        output = paged_attention(query, *kv_cache, metadata, self.scale)
        return project(self.o_proj, output.reshape(-1, self.query_size), lora, "o_proj")
