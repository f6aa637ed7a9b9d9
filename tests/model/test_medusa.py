"""The heads' arithmetic against a float64 computation written out head by head and block by block."""
import pytest
import torch

from loraserve.model.medusa import medusa_logits


def reference_logits(hidden: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor,
                     projections: torch.Tensor) -> torch.Tensor:
    hidden, weights, biases, projections = (tensor.double() for tensor in (hidden, weights, biases, projections))
    rows = []
    for state in hidden:
        heads = []
        for head in range(weights.shape[0]):
            x = state
            for layer in range(weights.shape[1]):
                z = weights[head, layer] @ x + biases[head, layer]
                x = x + z / (1 + torch.exp(-z))
            heads.append(projections[head] @ x)
        rows.append(torch.stack(heads))
    return torch.stack(rows)


@pytest.mark.parametrize("own_projections", [False, True])
@pytest.mark.parametrize("num_layers", [1, 3])
def test_heads_match_a_float64_reference(own_projections: bool, num_layers: int) -> None:
    generator = torch.Generator().manual_seed(3)
    num_heads, width, vocab = 4, 16, 50
    hidden = torch.randn(5, width, generator=generator)
    weights = torch.randn(num_heads, num_layers, width, width, generator=generator) / width ** 0.5
    biases = torch.randn(num_heads, num_layers, width, generator=generator)
    base_head = torch.randn(vocab, width, generator=generator)
    projections = torch.randn(num_heads, vocab, width, generator=generator) if own_projections else None
    logits = medusa_logits(hidden, weights, biases, projections, lambda states: states @ base_head.T)
    expected = reference_logits(hidden, weights, biases,
                                projections if own_projections else base_head.expand(num_heads, -1, -1))
    assert logits.shape == (5, num_heads, vocab) and logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-4)
