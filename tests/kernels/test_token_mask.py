"""A grammar's token bitmask on logits: the C++ pass and the torch form against numpy's bit unpacking, over random
bitmasks, every bit position, and a vocabulary that does not fill its last word."""
import numpy
import pytest
import torch

from loraserve.kernels import token_mask


@pytest.mark.parametrize("vocab", [49152, 1000, 33])
def test_forbidden_tokens_become_minus_infinity(vocab: int) -> None:
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=generator)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (5, words), dtype=torch.int32, generator=generator)
    bitmask[1] = -1  # everything allowed
    bitmask[2] = 0  # nothing allowed
    bitmask[3] = torch.tensor([1 << 31], dtype=torch.int64).to(torch.int32)  # only each word's last token
    allowed = numpy.unpackbits(bitmask.numpy().view(numpy.uint8), axis=1, bitorder="little")[:, :vocab]
    expected = logits.masked_fill(torch.from_numpy(allowed == 0), float("-inf"))
    for apply in (token_mask.KERNEL.get().apply_token_bitmask, token_mask.apply_token_bitmask_reference):
        masked = logits.clone()
        apply(masked, bitmask)
        assert torch.equal(masked, expected)
    assert torch.equal(masked[1], logits[1]) and masked[2].eq(float("-inf")).all()
    assert masked[0].isinf().any() and masked[0].isfinite().any()
