"""Our paged Llama against transformers' LlamaForCausalLM on tiny random checkpoints, in float32."""
from dataclasses import replace
from itertools import pairwise

import pytest
import torch
from transformers import LlamaForCausalLM

from loraserve.model.llama import LlamaModel
from loraserve.model.loader import LoadedModel, load_model
from tests.model.helpers import VOCAB_SIZE, PagedCache, paged_greedy, paged_prefill, save_tiny_llama

TOLERANCE = 1e-4
LLAMA3_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
VARIANTS = {
    "gqa-untied-llama3": dict(num_key_value_heads=2, rope_scaling=LLAMA3_SCALING),
    "mha-tied-linear": dict(
        num_key_value_heads=4, tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 4.0}
    ),
    "gqa-tied-default": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "mha-untied-default": dict(num_key_value_heads=4, rope_theta=500.0),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def models(request, tmp_path_factory) -> tuple[LoadedModel, LlamaForCausalLM]:
    directory = save_tiny_llama(tmp_path_factory.mktemp(request.param), **VARIANTS[request.param])
    reference = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return load_model(str(directory), torch.device("cpu"), torch.float32), reference


def random_tokens(length: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB_SIZE, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def reference_logits(reference: LlamaForCausalLM, tokens: list[int]) -> torch.Tensor:
    return reference(torch.tensor([tokens])).logits[0].float()


def max_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape
    return (ours - theirs).abs().max().item()


def test_loaded_config_matches_checkpoint(models):
    loaded, reference = models
    assert loaded.config.num_key_value_heads == reference.config.num_key_value_heads
    assert loaded.config.tie_word_embeddings == reference.config.tie_word_embeddings
    assert loaded.config.eos_token_ids == [2] and loaded.config.bos_token_id == 1
    assert (loaded.model.lm_head is None) == loaded.config.tie_word_embeddings
    assert not loaded.model.training


def test_prefill_logits_match(models):
    loaded, reference = models
    tokens = random_tokens(48, seed=1)
    ours = paged_prefill(loaded.model, tokens)
    expected = reference_logits(reference, tokens)
    assert expected.std() > 0.1, "logits this flat could not tell a wrong model from a right one"
    assert max_difference(ours, expected) < TOLERANCE


def test_chunked_prefill_then_decode_match(models):
    loaded, reference = models
    tokens = random_tokens(40, seed=2)
    expected = reference_logits(reference, tokens)
    cache = PagedCache(loaded.model, num_blocks=16)
    sequence = cache.add_sequence(len(tokens))
    bounds = [0, 7, 12, 13, 27] + list(range(28, len(tokens) + 1))  # chunks of 7, 5, 1, 14, then single tokens
    for start, end in pairwise(bounds):
        ours = cache.step([(sequence, tokens[start:end])])[0]
        assert max_difference(ours, expected[start:end]) < TOLERANCE, f"tokens {start}:{end}"


def test_mixed_batch_of_prefill_and_decode_match(models):
    """Two sequences share each step: one decodes while the other is still prefilling."""
    loaded, reference = models
    tokens = random_tokens(20, seed=3), random_tokens(13, seed=4)
    expected = [reference_logits(reference, sequence) for sequence in tokens]
    cache = PagedCache(loaded.model, num_blocks=24)
    assert [cache.add_sequence(len(sequence)) for sequence in tokens] == [0, 1]
    # Per step, the token range each sequence feeds (None: it sits the step out).
    steps = [[(0, 9), (0, 1)], [(9, 10), (1, 13)], [(10, 20), None]]
    for step in steps:
        chunks = [(index, bounds) for index, bounds in enumerate(step) if bounds is not None]
        outputs = cache.step([(index, tokens[index][start:end]) for index, (start, end) in chunks])
        for (index, (start, end)), ours in zip(chunks, outputs, strict=True):
            assert max_difference(ours, expected[index][start:end]) < TOLERANCE


def test_greedy_matches_generate(models):
    loaded, reference = models
    prompt = random_tokens(12, seed=5)
    expected = reference.generate(
        torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=[], pad_token_id=0
    )[0, len(prompt):].tolist()
    assert paged_greedy(loaded.model, prompt, max_new_tokens=20) == expected
    assert len(set(expected)) > 3, "a generation stuck on one token proves little"


@pytest.mark.parametrize("variant", ["gqa-untied-llama3", "mha-tied-linear"])
def test_rope_scaling_is_visible_at_this_length(variant, tmp_path):
    """Guards the tests above: dropping the scaling must move the logits far beyond the tolerance."""
    loaded = load_model(str(save_tiny_llama(tmp_path, **VARIANTS[variant])), torch.device("cpu"), torch.float32)
    unscaled = LlamaModel(replace(loaded.config, rope_scaling=None))
    unscaled.load_state_dict(loaded.model.state_dict())
    tokens = random_tokens(48, seed=1)
    assert max_difference(paged_prefill(loaded.model, tokens), paged_prefill(unscaled, tokens)) > 100 * TOLERANCE
