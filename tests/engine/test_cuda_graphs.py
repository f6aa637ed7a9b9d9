"""CUDA graphs replay decode steps with the same results as running them eagerly (GPU only)."""
from pathlib import Path

import pytest
import torch

from server.config import ServerConfig
from server.engine.engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from server.model.loader import load_model
from tests.api.lora_helpers import save_random_adapter
from tests.model.helpers import save_tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = [[5, 17, 42, 9], [100, 3, 3, 250, 61, 7, 11], [8] * 13, [300, 200, 100], [12, 13, 14, 15, 16, 17]]


@pytest.mark.parametrize("max_num_seqs", [3, 16])  # padded up to a captured size, or exactly one
def test_replayed_decode_steps_give_the_eager_tokens(tmp_path: Path, max_num_seqs: int) -> None:
    model_dir = save_tiny_llama(tmp_path / "model", seed=2)
    adapter_dir = save_random_adapter(model_dir, tmp_path / "adapter", seed=3, rank=8)
    loaded = load_model(str(model_dir), torch.device("cuda"), torch.float32)

    def run(cuda_graphs: bool) -> tuple[list[list[int]], int]:
        config = ServerConfig(block_size=16, num_kv_blocks=128, max_num_seqs=max_num_seqs, max_loras=2,
                              max_lora_rank=8, cuda_graphs=cuda_graphs, adapter_dir=str(tmp_path / str(cuda_graphs)))
        engine = LLMEngine(loaded, config)
        engine.adapters.add_from_path("adapter", adapter_dir)
        references = [engine.adapters.resolve("adapter") if index % 2 else None for index in range(len(PROMPTS))]
        for reference in filter(None, references):
            engine.adapters.ensure_loaded(reference)
        outputs = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
                                  references)
        graphs = engine.runner.graphs
        return outputs, graphs.num_replays if graphs is not None else 0

    eager, no_replays = run(cuda_graphs=False)
    replayed, replays = run(cuda_graphs=True)
    assert no_replays == 0 and replays > 30  # most steps were decode steps, replayed
    assert replayed == eager
