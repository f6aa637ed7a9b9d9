"""benchmarks.perplexity's figures through the engine equal transformers' (PEFT's with an adapter) on the same
rolling windows: a tiny random model with and without an adapter, and the embedded model in float32."""
import math
from pathlib import Path

import pytest
import torch

from benchmarks.perplexity import engine_log_likelihood, rolling_windows, text_tokens, torch_log_likelihood
from loraserve.config import ServerConfig
from loraserve.engine.engine import LLMEngine
from loraserve.model.loader import load_model
from tests.api.lora_helpers import peft_model, save_random_adapter
from tests.model.helpers import save_tiny_llama

PARAGRAPHS = "\n\n".join([
    "The quick brown fox jumps over the lazy dog. Hello world, hello there!",
    "Paged attention caches keys and values in blocks; requests share the blocks of a common prefix.",
    "Rolling windows score a long text a piece at a time, each token once, with a context of at least half "
    "a window before it.",
])


def perplexity(log_likelihood: float, windows: list) -> float:
    return math.exp(-log_likelihood / sum(len(window.tokens) - window.first_scored for window in windows))


def test_windows_score_every_token_once_with_a_context() -> None:
    tokens = list(range(23))
    windows = rolling_windows(tokens, window=8, stride=4)
    scored = [window.tokens[position] for window in windows
              for position in range(window.first_scored, len(window.tokens))]
    assert scored == tokens[1:]
    assert all(window.first_scored >= 4 for window in windows[1:])


@pytest.mark.parametrize("with_adapter", [False, True])
def test_tiny_model_perplexity_equals_transformers(tmp_path: Path, with_adapter: bool) -> None:
    model_dir = save_tiny_llama(tmp_path / "model", seed=5)
    adapter_dir = save_random_adapter(model_dir, tmp_path / "adapter", seed=6, rank=8) if with_adapter else None
    loaded = load_model(str(model_dir), torch.device("cpu"), torch.float32)
    engine = LLMEngine(loaded, ServerConfig(block_size=4, num_kv_blocks=256, max_num_batched_tokens=24,
                                            adapter_dir=str(tmp_path / "registry")))
    if adapter_dir is not None:
        engine.adapters.add_from_path("adapter", adapter_dir)
    windows = rolling_windows(text_tokens(loaded.tokenizer, PARAGRAPHS), window=32, stride=12)
    assert len(windows) > 3
    ours = engine_log_likelihood(engine, windows, "adapter" if with_adapter else None)
    theirs = torch_log_likelihood(peft_model(model_dir, adapter_dir), windows)
    assert perplexity(ours, windows) == pytest.approx(perplexity(theirs, windows), rel=1e-4)
    assert engine.block_manager.num_free_blocks == 256 and engine.adapters.num_pins() == 0


@pytest.mark.slow
def test_embedded_model_perplexity_equals_transformers() -> None:
    from benchmarks.perplexity import load_transformers

    loaded = load_model("embedded", torch.device("cpu"), torch.float32)
    text = Path("README.md").read_text()[:3000]
    windows = rolling_windows(text_tokens(loaded.tokenizer, text), window=256, stride=128)
    ours = engine_log_likelihood(LLMEngine(loaded, ServerConfig(max_model_len=257)), windows, None)
    assert perplexity(ours, windows) == pytest.approx(perplexity(
        torch_log_likelihood(load_transformers(None), windows), windows), rel=1e-4)
