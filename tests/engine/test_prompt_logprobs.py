"""Prompt logprobs (scoring) against PEFT's forward (transformers' for the base): every prompt token's logprob,
rank and top alternatives, through chunked prefill, the prefix cache and preemption, for the base and two
adapters."""
from pathlib import Path

import pytest
import torch

from loraserve.config import ServerConfig
from loraserve.engine.engine import LLMEngine
from loraserve.engine.outputs import RequestOutput
from loraserve.engine.sampling_params import SamplingParams
from loraserve.model.loader import load_model
from tests.api.lora_helpers import peft_model, save_random_adapter
from tests.model.helpers import save_tiny_llama

ADAPTERS = {"attention": dict(rank=4, lora_alpha=8, targets=["q_proj", "v_proj"]), "everything": dict(rank=8)}
PROMPT = [1, 5, 17, 42, 9, 100, 3, 3, 250, 61, 7, 11, 8, 8, 8, 300, 200, 100, 12, 13, 14, 15, 16, 17, 40, 41, 2]
TOP = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("scoring-base"), seed=21)


@pytest.fixture(scope="module")
def adapter_dirs(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {name: save_random_adapter(model_dir, tmp_path_factory.mktemp(name), seed=200 + index, **settings)
            for index, (name, settings) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def reference(model_dir: Path, adapter_dirs: dict[str, Path]) -> dict[str | None, torch.Tensor]:
    """PEFT's (or the base model's) log-softmax at every prompt position, float64."""
    logprobs = {}
    for name in [None, *ADAPTERS]:
        model = peft_model(model_dir, adapter_dirs[name] if name else None)
        with torch.no_grad():
            logits = model(torch.tensor([PROMPT])).logits[0].double()
        logprobs[name] = logits.log_softmax(dim=-1)
    return logprobs


def make_engine(model_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path, **settings) -> LLMEngine:
    """Chunks of 7 tokens (not a multiple of the 4-token block), so a prompt spans several prefill steps."""
    loaded = load_model(str(model_dir), torch.device("cpu"), torch.float32)
    config = ServerConfig(**{"block_size": 4, "num_kv_blocks": 128, "max_num_batched_tokens": 7, "max_loras": 2,
                             "max_lora_rank": 8, "adapter_dir": str(tmp_path / "registry"), **settings})
    engine = LLMEngine(loaded, config)
    for name, directory in adapter_dirs.items():
        engine.adapters.add_from_path(name, directory)
    return engine


def run(engine: LLMEngine, request_id: str, params: SamplingParams, adapter: str | None) -> list[RequestOutput]:
    engine.add_request(request_id, PROMPT, params, engine.adapters.resolve(adapter) if adapter else None)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [output for output in engine.step() if output.request_id == request_id]
    return outputs


def check_scores(scores: list, expected: torch.Tensor) -> None:
    """Position p's score is the model's logprob of PROMPT[p] after PROMPT[:p], with its rank and top tokens."""
    assert len(scores) == len(PROMPT) and scores[0] is None
    for position, score in enumerate(scores[1:], start=1):
        row = expected[position - 1]
        assert score.token_id == PROMPT[position]
        assert score.logprob == pytest.approx(row[PROMPT[position]].item(), abs=1e-4)
        assert score.rank == int((row > row[PROMPT[position]]).sum()) + 1
        top_values, top_ids = row.topk(TOP)
        assert [token for token, _ in score.top] == top_ids.tolist()
        assert [value for _, value in score.top] == pytest.approx(top_values.tolist(), abs=1e-4)


@pytest.mark.parametrize("adapter", [None, *ADAPTERS])
def test_scores_over_prefill_chunks_equal_peft(model_dir, adapter_dirs, reference, tmp_path, adapter) -> None:
    engine = make_engine(model_dir, adapter_dirs, tmp_path)
    outputs = run(engine, "scored", SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=TOP), adapter)
    check_scores(outputs[0].prompt_logprobs, reference[adapter])
    assert all(output.prompt_logprobs is None for output in outputs[1:])  # reported once
    assert sum(len(output.token_ids) for output in outputs) == 3


def test_score_only_requests_end_after_their_prompt(model_dir, adapter_dirs, reference, tmp_path) -> None:
    """max_tokens 0: no token is generated, one output with every score, finish reason "length"."""
    engine = make_engine(model_dir, adapter_dirs, tmp_path)
    [output] = run(engine, "score-only", SamplingParams(max_tokens=0, prompt_logprobs=TOP), "everything")
    assert output.finished and output.finish_reason == "length" and output.token_ids == []
    check_scores(output.prompt_logprobs, reference["everything"])
    assert engine.block_manager.num_free_blocks == 128 and engine.adapters.num_pins() == 0


def test_cached_prompt_positions_are_computed_again_for_scores(model_dir, adapter_dirs, reference,
                                                               tmp_path) -> None:
    """A first request leaves the prompt in the prefix cache; a scoring request of it takes no cached block (its
    positions' logits are needed), while a plain request of it does."""
    engine = make_engine(model_dir, adapter_dirs, tmp_path)
    run(engine, "warm", SamplingParams(max_tokens=1), "attention")
    [scored] = run(engine, "scored", SamplingParams(max_tokens=0, prompt_logprobs=TOP), "attention")
    check_scores(scored.prompt_logprobs, reference["attention"])
    assert scored.num_cached_tokens == 0
    assert run(engine, "plain", SamplingParams(max_tokens=1), "attention")[0].num_cached_tokens > 0


def test_a_request_preempted_mid_prompt_scores_each_token_once(model_dir, adapter_dirs, reference,
                                                              tmp_path) -> None:
    engine = make_engine(model_dir, adapter_dirs, tmp_path)
    engine.add_request("scored", PROMPT, SamplingParams(max_tokens=2, prompt_logprobs=TOP),
                       engine.adapters.resolve("everything"))
    engine.step()
    engine.step()  # two chunks scored, then the request loses its blocks and computes its prompt again
    [sequence] = engine.scheduler.running
    engine.scheduler.preempt(sequence)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    check_scores(outputs[0].prompt_logprobs, reference["everything"])
