from collections.abc import Callable

import pytest
import torch

from loraserve.config import ServerConfig
from loraserve.engine.engine import LLMEngine
from loraserve.model.loader import LoadedModel, load_model
from tests.model.helpers import save_tiny_llama


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    directory = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=3, max_position_embeddings=512)
    return load_model(str(directory), torch.device("cpu"), torch.float32)


@pytest.fixture
def make_engine(tiny_model: LoadedModel) -> Callable[..., LLMEngine]:
    """A fresh engine (own KV cache, scheduler, metrics) over the shared tiny model."""
    def make(**settings) -> LLMEngine:
        return LLMEngine(tiny_model, ServerConfig(**{"block_size": 4, "num_kv_blocks": 256, **settings}))
    return make
