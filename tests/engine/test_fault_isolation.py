"""A step that raises ends only the requests that cause it; everyone else gets the output they would have got."""
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from loraserve.config import ServerConfig
from loraserve.engine.engine import MAX_CONSECUTIVE_CULPRITS, LLMEngine
from loraserve.engine.errors import EngineDeadError, RequestFailedError
from loraserve.engine.outputs import RequestOutput
from loraserve.engine.sampling_params import SamplingParams
from loraserve.model.loader import load_model
from tests.api.lora_helpers import save_random_adapter
from tests.model.helpers import save_tiny_llama

MARKER = 311  # a prompt holding this token makes the wrapped model raise whenever it computes that token
COMMON = [7, 8, 9, 10, 11, 12, 13, 14]  # two full blocks of 4: shared through the prefix cache


class FaultyModel:
    """The real model, except that a forward pass over the marker token raises (as a kernel bug would)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __call__(self, input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if bool((input_ids == MARKER).any()):
            raise RuntimeError("injected fault: the marker token reached the model")
        return self.model(input_ids, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.model, name)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("faulty-base"), seed=5)


@pytest.fixture(scope="module")
def adapter_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_adapter(model_dir, tmp_path_factory.mktemp("faulty-adapter"), seed=9, rank=4, lora_alpha=8)


@pytest.fixture
def make(model_dir: Path, adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> Callable[..., LLMEngine]:
    loaded = load_model(str(model_dir), torch.device("cpu"), torch.float32)

    def make_engine(faulty: bool, **settings) -> LLMEngine:
        config = ServerConfig(**{"block_size": 4, "num_kv_blocks": 200, "max_loras": 2, "max_lora_rank": 8,
                                 "max_num_batched_tokens": 64, "adapter_dir": str(tmp_path_factory.mktemp("store")),
                                 **settings})
        engine = LLMEngine(loaded, config)
        engine.adapters.add_from_path("style", adapter_dir)
        if faulty:
            engine.runner.model = FaultyModel(engine.runner.model)
        return engine
    return make_engine


def workload(marked: list[int]) -> list[tuple[list[int], SamplingParams, bool]]:
    """16 requests (prompt, settings, with the adapter?): greedy and seeded sampled ones, half of them sharing a
    prefix; the requests at the `marked` indices hold the marker."""
    requests = []
    for index in range(16):
        prompt = (COMMON if index % 2 else [20 + index]) + [30 + index, 40 + index, 50 + index]
        if index in marked:
            prompt = prompt + [MARKER, 60]
        params = SamplingParams(temperature=0.0 if index % 3 else 0.8, seed=index, max_tokens=6 + index % 5,
                                ignore_eos=True)
        requests.append((prompt, params, index % 4 == 1))
    return requests


def run(engine: LLMEngine, requests: list, arrivals_per_step: int = 4) -> dict[str, list[RequestOutput]]:
    """Requests arrive a few per step; each one's outputs, by index."""
    outputs: dict[str, list[RequestOutput]] = {}
    pending = list(enumerate(requests))
    while pending or engine.has_unfinished_requests():
        for index, (prompt, params, with_adapter) in pending[:arrivals_per_step]:
            adapter = engine.adapters.resolve("style") if with_adapter else None
            if adapter is not None:
                engine.adapters.ensure_loaded(adapter)
            engine.add_request(str(index), prompt, params, adapter)
            outputs[str(index)] = []
        pending = pending[arrivals_per_step:]
        for output in engine.step():
            outputs[output.request_id].append(output)
    return outputs


def tokens(outputs: list[RequestOutput]) -> list[int]:
    return [token for output in outputs for token in output.token_ids]


def assert_nothing_held(engine: LLMEngine) -> None:
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.sequences and not engine.scheduler.has_unfinished()
    assert engine.adapters.num_pins() == 0 and engine.adapters.num_references() == 0


@pytest.mark.parametrize("spec_tokens", [0, 3], ids=["plain", "speculative"])
@pytest.mark.parametrize("marked", [[5], [3, 12]], ids=["one-culprit", "two-culprits"])
def test_only_the_marked_requests_fail(make, marked, spec_tokens):
    """A culprit that shares a prefix with others admitted in its step makes them recompute it, not read it."""
    clean = run(make(False, spec_tokens=spec_tokens), workload([]))
    engine = make(True, spec_tokens=spec_tokens)
    outputs = run(engine, workload(marked))
    for index in range(16):
        if index in marked:
            assert isinstance(outputs[str(index)][-1].error, RequestFailedError)
            assert outputs[str(index)][-1].finish_reason == "error"
        else:
            assert tokens(outputs[str(index)]) == tokens(clean[str(index)]), index
            assert outputs[str(index)][-1].error is None
    assert engine.metrics.failed_steps._value.get() >= 1
    assert engine.metrics.requests_finished.labels(finished_reason="error")._value.get() == len(marked)
    assert_nothing_held(engine)


def test_requests_admitted_onto_a_culprits_blocks_compute_them_again(make):
    """The culprit is the first of its step to need the shared prefix, so it allocates those blocks and the
    others take them from the prefix cache in the same step: their KV was never written."""
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    sharing = [(COMMON + [30 + index, 31], greedy, False) for index in range(3)]
    engine = make(True)
    outputs = run(engine, [(COMMON + [MARKER, 1], greedy, False), *sharing])
    clean = run(make(False), sharing)
    assert isinstance(outputs["0"][-1].error, RequestFailedError)
    assert [tokens(outputs[str(index + 1)]) for index in range(3)] == [tokens(clean[str(index)]) for index in range(3)]
    assert engine.metrics.preemptions._value.get() >= 1
    assert_nothing_held(engine)


def test_a_fault_in_sampling_ends_only_its_request(make):
    """Settings the API would refuse (here an impossible number of logprobs) fail inside the sampler."""
    requests = workload([])
    broken = SamplingParams(temperature=0.0, max_tokens=4, logprobs=10**6)
    engine = make(False)
    outputs = run(engine, requests[:6] + [([70, 71, 72], broken, False)] + requests[6:])
    clean = run(make(False), requests)
    assert isinstance(outputs["6"][-1].error, RequestFailedError)
    for index in range(16):
        assert tokens(outputs[str(index if index < 6 else index + 1)]) == tokens(clean[str(index)])
    assert_nothing_held(engine)


def test_a_failing_proposer_leaves_its_request_unspeculated(make):
    clean = run(make(False), workload([]))
    engine = make(False, spec_tokens=3)
    propose = engine.speculation.proposer.propose
    proposed: list[set[str]] = []  # the requests of each successful proposal

    def faulty_propose(sequences, limits):
        if any(sequence.request_id == "4" for sequence in sequences):
            raise ValueError("injected proposer fault")
        propose(sequences, limits)
        proposed.append({sequence.request_id for sequence in sequences})
    engine.speculation.proposer.propose = faulty_propose
    outputs = run(engine, workload([]))
    assert {index: tokens(outputs[str(index)]) for index in range(16)} == \
           {index: tokens(clean[str(index)]) for index in range(16)}
    assert len(proposed) > 8 and all("4" not in requests for requests in proposed)
    assert_nothing_held(engine)


def test_an_adapter_that_cannot_be_read_fails_its_requests_alone(make, adapter_dir, tmp_path):
    """Its file was damaged after the request resolved it and its memory copy was evicted: the loader's read
    fails, and so does the request, while the one beside it runs on."""
    engine = make(False, max_cpu_loras=1, adapter_dir=str(tmp_path / "store"))
    engine.adapters.add_from_path("other", adapter_dir)
    style = engine.adapters.resolve("style")
    engine.adapters.ensure_loaded(style)
    (tmp_path / "store" / "style" / "v1" / "adapter_model.safetensors").write_bytes(b"damaged")
    other = engine.adapters.resolve("other")
    engine.adapters.ensure_loaded(other)  # the one memory copy is now `other`'s
    greedy = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    engine.add_request("doomed", [20, 21, 22], greedy, style)  # its load starts now, and fails
    engine.add_request("base", [23, 24, 25], greedy)
    outputs: dict[str, list[RequestOutput]] = {"doomed": [], "base": []}
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs[output.request_id].append(output)
    error = outputs["doomed"][-1].error
    assert isinstance(error, RequestFailedError) and "AdapterFormatError" in str(error)
    assert len(tokens(outputs["base"])) == 5
    engine.adapters.unpin(other)
    assert_nothing_held(engine)


def test_a_fault_every_request_hits_stops_the_engine(make):
    engine = make(True)
    every = [([MARKER, index], SamplingParams(temperature=0.0, max_tokens=2), False)
             for index in range(MAX_CONSECUTIVE_CULPRITS + 2)]
    with pytest.raises(EngineDeadError):
        run(engine, every, arrivals_per_step=1)
