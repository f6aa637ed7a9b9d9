"""Medusa heads at run time: from the decoder's last hidden state at a position, head k guesses the token k + 1
places after the one the model's own head predicts there. Each head is residual blocks x + SiLU(W x + b) then a
projection to the vocabulary: its own (Medusa-1) or the base model's head (LoRAX's layout, whose heads then cost
a few small matrices and share the base head's quantized kernel)."""
from collections.abc import Callable

import torch
import torch.nn.functional as F


def medusa_logits(hidden: torch.Tensor, block_weights: torch.Tensor, block_biases: torch.Tensor,
                  projections: torch.Tensor | None, base_logits: Callable[[torch.Tensor], torch.Tensor]
                  ) -> torch.Tensor:
    """hidden [n, hidden] -> each head's logits [n, heads, vocab] (float32), from the heads' blocks' weights
    [heads, layers, hidden, hidden] and biases [heads, layers, hidden] and their projections [heads, vocab, hidden],
    or `base_logits`, the model's own head, where they have none."""
    num_heads = block_weights.shape[0]
    states = hidden.to(block_weights.dtype).unsqueeze(0).expand(num_heads, -1, -1)
    for layer in range(block_weights.shape[1]):
        update = torch.baddbmm(block_biases[:, layer, None, :], states, block_weights[:, layer].transpose(1, 2))
        states = states + F.silu(update)
    if projections is None:
        _, rows, width = states.shape
        return base_logits(states.reshape(-1, width)).view(num_heads, rows, -1).transpose(0, 1).float()
    return torch.bmm(states, projections.transpose(1, 2)).transpose(0, 1).float()
