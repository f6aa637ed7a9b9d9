"""Every adapter kind in the engine against PEFT's forward: prompt tuning (TEXT and RANDOM init), prefix tuning
(with and without its projection), LoRA with DoRA and rank/alpha patterns, and the base model, in one batch."""
from pathlib import Path

import pytest
import torch

from loraserve.config import ServerConfig
from loraserve.engine.engine import LLMEngine
from loraserve.engine.sampling_params import SamplingParams
from loraserve.model.loader import load_model
from tests.api.lora_helpers import ADAPTER_KINDS, peft_model, save_adapter_of_kind, single_thread
from tests.model.helpers import save_tiny_llama

PROMPT_LEARNING = [name for name, settings in ADAPTER_KINDS.items() if "peft_type" in settings]
KINDS = [None, *ADAPTER_KINDS]
PROMPTS = [[5, 17, 42, 9], [100, 3, 3, 250, 61, 7, 11], [8] * 13, [12, 13, 14, 15, 16, 17, 18, 19, 20]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("kinds-base"), seed=12)


@pytest.fixture(scope="module")
def adapter_dirs(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {name: save_adapter_of_kind(model_dir, tmp_path_factory.mktemp(name), name, 200 + index)
            for index, name in enumerate(ADAPTER_KINDS)}


def make_engine(model_dir: Path, adapter_dirs: dict[str, Path], directory: Path, draft: bool = False,
                **settings) -> LLMEngine:
    loaded = load_model(str(model_dir), torch.device("cpu"), torch.float32)
    config = ServerConfig(**{"block_size": 4, "num_kv_blocks": 256, "max_loras": 8, "max_lora_rank": 8,
                             "adapter_dir": str(directory), **settings})
    engine = LLMEngine(loaded, config, draft=load_model(str(model_dir), torch.device("cpu"), torch.float32)
                       if draft else None)
    for name, adapter_dir in adapter_dirs.items():
        engine.adapters.add_from_path(name, adapter_dir)
    return engine


@pytest.fixture(scope="module")
def engine(model_dir: Path, adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> LLMEngine:
    return make_engine(model_dir, adapter_dirs, tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="module")
def peft_logits(model_dir: Path, adapter_dirs: dict[str, Path]) -> dict[tuple[str | None, int], torch.Tensor]:
    """PEFT's forward over each prompt (the prompt's own positions, after any virtual tokens), by kind and prompt."""
    logits = {}
    with torch.no_grad(), single_thread():
        for name in KINDS:
            model = peft_model(model_dir, adapter_dirs[name] if name else None)
            for index, prompt in enumerate(PROMPTS):
                logits[name, index] = model(input_ids=torch.tensor([prompt])).logits[0, -len(prompt):]
    return logits


def peft_greedy_from_logits(model: torch.nn.Module, prompt: list[int], num_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad(), single_thread():
        for _ in range(num_tokens):
            ids = torch.cat([ids, model(input_ids=ids).logits[0, -1].argmax().view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


def run(engine: LLMEngine, requests: list[tuple[list[int], str | None]], params: SamplingParams) -> list[list[int]]:
    outputs: list[list[int]] = [[] for _ in requests]
    for index, (prompt, name) in enumerate(requests):
        engine.add_request(str(index), prompt, params, engine.adapters.resolve(name) if name else None)
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs[int(output.request_id)].extend(output.token_ids)
    return outputs


def assert_nothing_held(engine: LLMEngine) -> None:
    assert engine.adapters.num_references() == 0 and engine.adapters.num_pins() == 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_one_batch_of_every_kind_gives_pefts_logits(engine, peft_logits):
    requests = [(prompt, name) for prompt in PROMPTS for name in KINDS]
    for index, (prompt, name) in enumerate(requests):
        adapter = engine.adapters.resolve(name) if name else None
        if adapter:
            engine.adapters.make_resident(adapter)
        engine.add_request(str(index), prompt, SamplingParams(temperature=0.0, max_tokens=1), adapter)
    batch = engine.scheduler.schedule()
    assert len(batch.sequences) == len(requests)  # one step holds them all
    logits, sampling, _, _ = engine.runner.execute(batch)
    assert sampling == list(range(len(requests)))
    for row, (prompt, name) in enumerate(requests):
        expected = peft_logits[name, PROMPTS.index(prompt)][-1]
        assert torch.allclose(logits[row], expected, atol=1e-4, rtol=0), (name, prompt)
        if name:
            assert not torch.allclose(expected, peft_logits[None, PROMPTS.index(prompt)][-1], atol=1e-2), name
    for sequence in list(engine.scheduler.running):
        engine.abort_request(sequence.request_id)
    assert_nothing_held(engine)


@pytest.fixture(scope="module")
def peft_outputs(model_dir: Path, adapter_dirs: dict[str, Path]) -> dict[tuple[str | None, int], list[int]]:
    outputs = {}
    for name in KINDS:
        model = peft_model(model_dir, adapter_dirs[name] if name else None)
        for index, prompt in enumerate(PROMPTS):
            outputs[name, index] = peft_greedy_from_logits(model, prompt, 8)
    return outputs


GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def test_greedy_outputs_of_a_mixed_batch_equal_each_alone_and_peft(engine, peft_outputs):
    requests = [(prompt, name) for prompt in PROMPTS for name in KINDS]
    together = run(engine, requests, GREEDY)
    for (prompt, name), output in zip(requests, together):
        assert output == peft_outputs[name, PROMPTS.index(prompt)], (name, prompt)
        assert run(engine, [(prompt, name)], GREEDY) == [output]
    assert_nothing_held(engine)


@pytest.mark.parametrize("settings", [
    pytest.param(dict(max_num_batched_tokens=6), id="chunked-prefill"),
    pytest.param(dict(num_kv_blocks=24), id="preemption"),
    pytest.param(dict(spec_tokens=3), id="prompt-lookup"),
    pytest.param(dict(spec_tokens=2, draft=True), id="draft-model"),
    pytest.param(dict(prefix_caching=False), id="no-prefix-cache"),
])
def test_every_kind_gives_the_same_outputs_under(settings, model_dir, adapter_dirs, peft_outputs, tmp_path):
    """A draft model (the base model) drafts from the prompt alone, knowing no adapter; the target verifies."""
    engine = make_engine(model_dir, adapter_dirs, tmp_path, **settings)
    preempted = []
    preempt = engine.scheduler.preempt
    engine.scheduler.preempt = lambda sequence: (preempted.append(sequence.adapter), preempt(sequence))
    requests = [(prompt, name) for prompt in PROMPTS for name in KINDS]
    outputs = run(engine, requests, GREEDY)
    for (prompt, name), output in zip(requests, outputs):
        assert output == peft_outputs[name, PROMPTS.index(prompt)], (name, prompt)
    assert bool(preempted) == ("num_kv_blocks" in settings)
    assert_nothing_held(engine)


def test_aborts_of_every_kind_return_what_they_held(engine):
    """Aborted while waiting, mid-prompt and mid-output: no block, slot reference or pin stays held."""
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    for name in KINDS:
        for index, prompt in enumerate(PROMPTS):
            engine.add_request(f"{name}-{index}", prompt * 3, params, engine.adapters.resolve(name) if name else None)
    budget = engine.scheduler.max_num_batched_tokens
    engine.scheduler.max_num_batched_tokens = 40  # some stay waiting, some are mid-prompt after one step
    try:
        for _ in range(3):
            engine.step()
            for request_id in list(engine.sequences)[::3]:
                engine.abort_request(request_id)
    finally:
        engine.scheduler.max_num_batched_tokens = budget
    for request_id in list(engine.sequences):
        engine.abort_request(request_id)
    assert_nothing_held(engine)


@pytest.mark.parametrize("name", ADAPTER_KINDS)
def test_a_version_replaced_mid_request_keeps_serving_the_request_that_began_on_it(engine, adapter_dirs, peft_outputs,
                                                                                 name):
    engine.add_request("old", PROMPTS[3], GREEDY, engine.adapters.resolve(name))
    outputs = [token for output in engine.step() for token in output.token_ids]
    replacement = "prefix-projection" if name != "prefix-projection" else "dora"  # another kind, the same name
    engine.adapters.add_from_path(name, adapter_dirs[replacement])
    while engine.has_unfinished_requests():
        outputs += [token for output in engine.step() for token in output.token_ids]
    assert outputs == peft_outputs[name, 3]
    assert run(engine, [(PROMPTS[3], name)], GREEDY) == [peft_outputs[replacement, 3]]
    engine.adapters.add_from_path(name, adapter_dirs[name])  # back as it was, for the other tests
    assert_nothing_held(engine)


@pytest.mark.parametrize("name", PROMPT_LEARNING)
def test_repeated_requests_share_the_virtual_tokens_through_the_prefix_cache(engine, peft_outputs, name):
    prompt = PROMPTS[3]
    first = run(engine, [(prompt, name)], GREEDY)
    engine.add_request("again", prompt, GREEDY, engine.adapters.resolve(name))
    outputs = [token for output in engine.step() for token in output.token_ids]
    virtual = engine.adapters.info(engine.sequences["again"].adapter).num_virtual_tokens
    assert engine.sequences["again"].num_computed_tokens >= virtual // 4 * 4 > 0  # found cached, not computed
    while engine.has_unfinished_requests():
        outputs += [token for output in engine.step() for token in output.token_ids]
    assert first == [outputs] == [peft_outputs[name, 3]]
    assert_nothing_held(engine)


@pytest.mark.parametrize("name", PROMPT_LEARNING)
def test_prompt_logprobs_after_virtual_tokens_equal_pefts(engine, peft_logits, name):
    prompt = PROMPTS[1]
    engine.add_request("score", prompt, SamplingParams(max_tokens=0, prompt_logprobs=0),
                       engine.adapters.resolve(name))
    scores = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            scores = output.prompt_logprobs if output.prompt_logprobs is not None else scores
    expected = peft_logits[name, 1].log_softmax(dim=-1)
    assert scores[0] is None and len(scores) == len(prompt)
    for position, score in enumerate(scores[1:]):
        assert score.logprob == pytest.approx(expected[position, prompt[position + 1]].item(), abs=1e-4)
    assert_nothing_held(engine)


def test_the_context_counts_the_virtual_tokens(engine):
    from loraserve.engine.errors import RequestValidationError

    adapter = engine.adapters.resolve("prompt-random")
    room = engine.max_model_len - 8 - len(PROMPTS[0])
    engine.validate(PROMPTS[0], SamplingParams(max_tokens=room), adapter)
    with pytest.raises(RequestValidationError, match="after the adapter's 8 virtual tokens"):
        engine.validate(PROMPTS[0], SamplingParams(max_tokens=room + 1), adapter)
    engine.adapters.unpin(adapter)
