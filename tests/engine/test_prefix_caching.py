"""Prefix caching changes how much is computed, never what is generated: greedy outputs with the cache equal those
without it, over shared, partly shared and identical prompts, follow-up turns, preemption and eviction, and
adapters (whose KV is never shared across adapters or versions)."""
import random
from pathlib import Path

import pytest
import torch

from loraserve.config import ServerConfig
from loraserve.engine.engine import LLMEngine
from loraserve.engine.sampling_params import SamplingParams
from loraserve.model.loader import load_model
from tests.api.lora_helpers import save_random_adapter
from tests.engine.helpers import ComputedTokens, run_staggered
from tests.model.helpers import save_tiny_llama

# 2.5, 1.5 and 4.25 blocks of 4, and the first one's later blocks after another first block
SYSTEM_PROMPTS = [list(range(10, 20)), list(range(40, 46)), list(range(60, 77)),
                  list(range(90, 94)) + list(range(14, 20))]


def shared_prefix_workload(count: int, seed: int = 0) -> list[tuple[list[int], SamplingParams]]:
    """Prompts that start with all or part of a system prompt (whole blocks, a block and a half, a whole prompt
    of cached blocks, less than a block), then their own tokens or none; every third one is a repeat."""
    rng = random.Random(seed)
    workload: list[tuple[list[int], SamplingParams]] = []
    for index in range(count):
        if index % 3 == 2:
            workload.append(workload[rng.randrange(index)])
            continue
        system = rng.choice(SYSTEM_PROMPTS)
        prefix = system[:rng.choice([3, 6, 8, len(system)])]
        prompt = prefix + [rng.randrange(100, 320) for _ in range(rng.choice([0, 1, 5, 7]))]
        params = SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 16), ignore_eos=index % 2 == 0)
        workload.append((prompt, params))
    return workload


def assert_no_block_is_held(engine: LLMEngine) -> None:
    manager = engine.block_manager
    assert not any(manager.reference_counts)
    assert sorted(manager.free_queue) == list(range(manager.num_blocks))
    assert all(manager.block_keys[block] == key for key, block in manager.cached.items())


@pytest.mark.parametrize("num_kv_blocks", [256, 16], ids=["ample-cache", "evicting-and-preempting-cache"])
def test_outputs_are_the_same_with_and_without_the_cache(make_engine, num_kv_blocks):
    workload = shared_prefix_workload(24)
    runs = {}
    for caching in (False, True):
        engine = make_engine(num_kv_blocks=num_kv_blocks, max_num_batched_tokens=32, max_num_seqs=16,
                             prefix_caching=caching)
        computed = ComputedTokens(engine)
        runs[caching] = run_staggered(engine, workload, arrivals_per_step=2), computed.total, engine
    (uncached, uncached_total, _), (cached, cached_total, engine) = runs[False], runs[True]
    assert cached == uncached
    assert cached_total < uncached_total
    assert engine.metrics.prefix_cache_hits._value.get() > 0
    assert engine.metrics.prefix_cache_queries._value.get() >= sum(len(prompt) for prompt, _ in workload)
    if num_kv_blocks == 16:
        assert engine.metrics.preemptions._value.get() > 0
        assert engine.metrics.prefix_cache_evictions._value.get() > 0
    assert_no_block_is_held(engine)
    assert not runs[False][2].block_manager.cached


def generate(engine: LLMEngine, prompt: list[int], params: SamplingParams, adapter_name: str | None = None,
             ) -> tuple[list[int], int]:
    """One request run to its end: its output tokens, and how many prompt tokens it found cached."""
    adapter = engine.adapters.resolve(adapter_name) if adapter_name else None
    if adapter is not None:
        engine.adapters.ensure_loaded(adapter)
    engine.add_request("request", prompt, params, adapter)
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens.extend(output.token_ids)
            num_cached = output.num_cached_tokens
    return tokens, num_cached


def test_a_follow_up_turn_reuses_the_generated_tokens(make_engine):
    params = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
    first_turn = SYSTEM_PROMPTS[0] + [200, 201, 202]  # 13 tokens
    engines = [make_engine(prefix_caching=False), make_engine()]
    answers = [generate(engine, first_turn, params) for engine in engines]
    assert answers[0] == answers[1] and answers[1][1] == 0
    second_turn = first_turn + answers[0][0] + [210, 211]
    replies = [generate(engine, second_turn, params) for engine in engines]
    assert replies[0][0] == replies[1][0]
    assert replies[1][1] == 20  # 21 tokens had KV (13 prompt, 8 of 9 answer): five full blocks
    assert_no_block_is_held(engines[1])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("prefix-base"), seed=5)


def adapter_engine(model_dir: Path, adapter_dir: Path, caching: bool) -> LLMEngine:
    loaded = load_model(str(model_dir), torch.device("cpu"), torch.float32)
    config = ServerConfig(block_size=4, num_kv_blocks=64, max_loras=3, max_lora_rank=8,
                          adapter_dir=str(adapter_dir), prefix_caching=caching)
    return LLMEngine(loaded, config)


def test_adapters_and_versions_never_share_kv(model_dir, tmp_path):
    adapters = {seed: save_random_adapter(model_dir, tmp_path / f"seed-{seed}", seed) for seed in (1, 2, 3)}
    prompt, params = SYSTEM_PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    results = {}
    for caching in (False, True):
        engine = adapter_engine(model_dir, tmp_path / f"registry-{caching}", caching)
        engine.adapters.add_from_path("alpha", adapters[1])
        engine.adapters.add_from_path("beta", adapters[2])
        names = [None, "alpha", "beta", "alpha", None]
        results[caching] = [generate(engine, prompt, params, name) for name in names]
        engine.adapters.add_from_path("alpha", adapters[3])  # version 2 of alpha
        results[caching].append(generate(engine, prompt, params, "alpha"))
        assert engine.adapters.num_pins() == 0
    assert [tokens for tokens, _ in results[True]] == [tokens for tokens, _ in results[False]]
    assert [cached for _, cached in results[True]] == [0, 0, 0, 16, 16, 0]  # 17 tokens: 4 full blocks
    assert len({tuple(tokens) for tokens, _ in results[True]}) > 2  # the adapters change the answers


def test_the_same_prompt_under_two_adapters_gets_different_digests_and_blocks(model_dir, tmp_path):
    engine = adapter_engine(model_dir, tmp_path / "registry", caching=True)
    for name, seed in (("alpha", 1), ("beta", 2)):
        engine.adapters.add_from_path(name, save_random_adapter(model_dir, tmp_path / name, seed))
    for name in (None, "alpha", "beta"):
        adapter = engine.adapters.resolve(name) if name else None
        if adapter is not None:
            engine.adapters.make_resident(adapter)  # so one step admits all three
        engine.add_request(str(name), SYSTEM_PROMPTS[2], SamplingParams(max_tokens=1), adapter)
    batch = engine.scheduler.schedule()
    digests = [sequence.block_digests for sequence in batch.sequences]
    blocks = [sequence.block_table for sequence in batch.sequences]
    assert all(len(chain) == 4 for chain in digests)
    assert len({value for chain in digests for value in chain}) == 12
    assert len({block for table in blocks for block in table}) == 15
    assert engine.block_manager.num_cached_blocks == 12
    for sequence in list(batch.sequences):
        engine.abort_request(sequence.request_id)
    assert_no_block_is_held(engine)
