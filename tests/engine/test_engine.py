import random

import pytest

from loraserve.engine.errors import RequestValidationError
from loraserve.engine.sampling_params import SamplingParams
from tests.engine.helpers import run_staggered


def make_workload(count: int, seed: int = 0) -> list[tuple[list[int], SamplingParams]]:
    """Prompts of 1 to 60 tokens and outputs of 1 to 24, greedy unless a seed is given."""
    rng = random.Random(seed)
    workload = []
    for index in range(count):
        prompt = [rng.randrange(3, 320) for _ in range(rng.choice([1, 2, 5, 17, 33, 60]))]
        params = SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 24), ignore_eos=index % 2 == 0)
        workload.append((prompt, params))
    return workload


def run_alone(make_engine, workload) -> list[list[int]]:
    return [make_engine().generate([prompt], params)[0] for prompt, params in workload]


@pytest.mark.parametrize("num_kv_blocks", [256, 24], ids=["ample-cache", "preempting-cache"])
def test_continuous_batching_is_invisible(make_engine, num_kv_blocks):
    workload = make_workload(16)
    alone = run_alone(make_engine, workload)
    engine = make_engine(num_kv_blocks=num_kv_blocks, max_num_batched_tokens=48, max_num_seqs=16)
    together = run_staggered(engine, workload)
    assert [together[str(index)] for index in range(16)] == alone
    for (prompt, params), output in zip(workload, alone):
        assert len(output) <= params.max_tokens and (not params.ignore_eos or len(output) == params.max_tokens)
    if num_kv_blocks == 24:
        assert engine.metrics.preemptions._value.get() > 0
    assert engine.block_manager.num_free_blocks == num_kv_blocks
    assert not engine.sequences


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(make_engine):
    workload = [(prompt, SamplingParams(temperature=0.9, top_p=0.95, max_tokens=12, seed=index, ignore_eos=True))
                for index, (prompt, _) in enumerate(make_workload(6, seed=1))]
    alone = run_alone(make_engine, workload)
    together = run_staggered(make_engine(max_num_batched_tokens=40), workload, arrivals_per_step=2)
    assert [together[str(index)] for index in range(6)] == alone
    assert len({tuple(output) for output in alone}) > 1


def test_stop_string_cuts_the_text_and_finishes_the_request(make_engine):
    prompt = make_engine().tokenizer.encode("hello world, the quick")
    engine = make_engine()
    engine.add_request("free", prompt, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    full_text = "".join(output.text for _ in range(25) for output in engine.step())
    stop = full_text[len(full_text) // 2: len(full_text) // 2 + 3]
    assert len(stop) == 3

    engine.add_request("stopped", prompt, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                                                         stop=[stop]))
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(engine.step())
    assert "".join(output.text for output in outputs) == full_text[:full_text.index(stop)]
    assert outputs[-1].finished and outputs[-1].finish_reason == "stop" and outputs[-1].stop_reason == stop
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_abort_frees_blocks_at_once(make_engine):
    engine = make_engine()
    engine.add_request("a", list(range(3, 40)), SamplingParams(max_tokens=50))
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    engine.abort_request("a")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("prompt, max_tokens, message", [
    ([], 5, "empty"),
    ([5] * 600, 5, "context holds"),
    ([5] * 10, 600, "exceeds"),
    ([5, 100000], 5, "token ids"),
    ([5], -1, "at least 0"),
])
def test_requests_that_can_never_run_are_refused(make_engine, prompt, max_tokens, message):
    with pytest.raises(RequestValidationError, match=message):
        make_engine().add_request("x", prompt, SamplingParams(max_tokens=max_tokens))
