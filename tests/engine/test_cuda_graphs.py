"""CUDA graphs replay decode steps with the same results as running them eagerly. On the CPU, a stand-in that
replays by recomputing checks the buffers a step is copied into (padding rows, block tables, slots); the graphs
themselves are checked on a GPU."""
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from loraserve.config import ServerConfig
from loraserve.engine.cuda_graphs import CapturedStep, DecodeGraphs
from loraserve.engine.engine import LLMEngine
from loraserve.engine.sampling_params import SamplingParams
from loraserve.model.loader import load_model
from tests.api.lora_helpers import save_random_adapter
from tests.model.helpers import save_tiny_llama

PROMPTS = [[5, 17, 42, 9], [100, 3, 3, 250, 61, 7, 11], [8] * 13, [300, 200, 100], [12, 13, 14, 15, 16, 17]]


class ReplayByRecomputing:
    """Stands in for a captured graph on the CPU: a replay runs the captured forward again into its output."""

    def __init__(self, forward: Callable[[], torch.Tensor], hidden: torch.Tensor) -> None:
        self.forward, self.hidden = forward, hidden

    def replay(self) -> None:
        self.hidden.copy_(self.forward())


@torch.inference_mode()
def stand_in_graphs(engine: LLMEngine, max_num_seqs: int) -> DecodeGraphs:
    runner = engine.runner
    graphs = DecodeGraphs(runner.model, runner.kv_caches, runner.lora_weights, max_num_seqs, engine.max_model_len,
                          runner.block_size)
    for size in graphs.sizes:
        def forward(size: int = size) -> torch.Tensor:
            return graphs._forward(size, with_lora=False)
        hidden = forward()
        graphs.steps[size, False] = CapturedStep(ReplayByRecomputing(forward, hidden), hidden)
    return graphs


def test_decode_steps_copied_into_padded_buffers_give_the_eager_tokens(tiny_model) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = PROMPTS[:3]  # three sequences replay the graph of four: one padding row
    config = ServerConfig(block_size=4, num_kv_blocks=128, max_num_seqs=5)
    eager = LLMEngine(tiny_model, config).generate(prompts, params)
    engine = LLMEngine(tiny_model, config)
    engine.runner.graphs = stand_in_graphs(engine, max_num_seqs=5)
    assert engine.runner.graphs.sizes == [1, 2, 4, 5]
    assert engine.generate(prompts, params) == eager
    assert engine.runner.graphs.num_replays >= 23  # every decode step replayed


@pytest.mark.parametrize("max_num_seqs", [3, 16])  # padded up to a captured size, or exactly one
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
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
