"""Speculative decoding in the engine: greedy outputs equal plain decoding token for token, whatever proposes the
drafts, with adapters, stop strings and length limits landing inside accepted runs; every KV block comes back."""
import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from loraserve.config import ServerConfig
from loraserve.engine import engine as engine_module
from loraserve.engine.engine import LLMEngine
from loraserve.engine.sampler import Sampled
from loraserve.engine.sampling_params import SamplingParams
from loraserve.model.loader import LoadedModel, load_model
from tests.api.lora_helpers import save_random_adapter
from tests.engine.medusa_helpers import train_tiny_heads
from tests.model.helpers import save_tiny_llama

PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [10, 11, 12, 13, 14, 10, 11, 12], list(range(30, 50)) * 2, [7] * 9,
           [100, 3, 3, 250, 61, 7, 11]]
ADAPTERS = (None, "attention", "everything")
LENGTH = 40
PRIMING = 24  # tokens of its own answer each prompt ends with


def save_looping_llama(directory: Path, seed: int, **overrides) -> Path:
    """Small weights make a tiny model's greedy output fall into loops, so prompt lookup's drafts often hold."""
    return save_tiny_llama(directory, seed=seed, max_position_embeddings=512, initializer_range=0.05, **overrides)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_looping_llama(tmp_path_factory.mktemp("target"), seed=11)


@pytest.fixture(scope="module")
def target(model_dir: Path) -> LoadedModel:
    return load_model(str(model_dir), torch.device("cpu"), torch.float32)


def save_perturbed_copy(model_dir: Path, directory: Path, noise: float) -> Path:
    """The target with noise on every weight: a draft whose guesses are mostly, not always, right."""
    model = LlamaForCausalLM.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter += noise * torch.randn(parameter.shape, generator=generator) * parameter.std()
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def adapter_dirs(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {"attention": save_random_adapter(model_dir, tmp_path_factory.mktemp("a"), seed=1, rank=4,
                                             targets=["q_proj", "v_proj"]),
            "everything": save_random_adapter(model_dir, tmp_path_factory.mktemp("e"), seed=2, rank=8)}


@pytest.fixture(scope="module")
def proposers(target: LoadedModel, model_dir: Path, adapter_dirs: dict[str, Path],
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """What each proposer takes (make_engine's arguments): prompt lookup, a noisy copy of the target, the target
    itself (never wrong for requests without an adapter), and Medusa heads trained on the target's answers, with
    the same adapters carrying heads of their own, trained on their answers."""
    noisy = save_perturbed_copy(model_dir, tmp_path_factory.mktemp("draft"), noise=0.3)
    heads = train_tiny_heads(target, PROMPTS, tmp_path_factory.mktemp("medusa"))
    with_heads = {}
    for name, directory in adapter_dirs.items():
        with_heads[name] = shutil.copytree(directory, tmp_path_factory.mktemp(f"{name}-with-heads") / name)
        train_tiny_heads(target, PROMPTS, with_heads[name], adapter=with_heads[name])
    return {"prompt lookup": {}, "draft model": {"draft": load_model(str(noisy), torch.device("cpu"), torch.float32)},
            "target as draft": {"draft": target},
            "medusa heads": {"medusa_heads": str(heads), "adapters": with_heads,
                             "max_lora_rank": 16}}  # the adapters' heads hold pages of the pool too


@pytest.fixture
def make_engine(target, adapter_dirs, tmp_path) -> Callable[..., LLMEngine]:
    def make(draft: LoadedModel | None = None, adapters: dict[str, Path] | None = None, **settings) -> LLMEngine:
        config = ServerConfig(**{"block_size": 4, "num_kv_blocks": 2048, "max_loras": 2, "max_lora_rank": 8,
                                 "spec_ngram_min": 1, "spec_ngram_max": 3,
                                 # every draft verified (which drafts pay is test_draft_budget's part)
                                 "spec_adaptive": False, **settings})
        engine = LLMEngine(target, dataclasses.replace(config, adapter_dir=str(tmp_path / str(id(config)))),
                           draft=draft)
        for name, directory in (adapters or adapter_dirs).items():
            engine.adapters.add_from_path(name, directory)
        return engine
    return make


class Run:
    """Drives an engine over a workload; records each request's tokens, finish reason, and how many tokens the
    step that finished it verified (more than it returned means a stop landed inside an accepted run)."""

    def __init__(self, engine: LLMEngine, workload: list[tuple[list[int], str | None, SamplingParams]],
                 monkeypatch: pytest.MonkeyPatch) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.finish: dict[str, tuple[str, int, int]] = {}  # reason, tokens returned, tokens verified
        last_verified: dict[str, int] = {}
        sample = engine_module.sample

        def recording_sample(logits: torch.Tensor, sequences: list) -> list[Sampled]:
            results = sample(logits, sequences)
            last_verified.update({s.request_id: len(r.token_ids) for s, r in zip(sequences, results)})
            return results

        monkeypatch.setattr(engine_module, "sample", recording_sample)
        for index, (prompt, name, params) in enumerate(workload):
            engine.add_request(str(index), prompt, params, engine.adapters.resolve(name) if name else None)
            self.tokens[str(index)] = []
        while engine.has_unfinished_requests():
            for output in engine.step():
                self.tokens[output.request_id] += output.token_ids
                if output.finished:
                    self.finish[output.request_id] = (output.finish_reason, len(output.token_ids),
                                                      last_verified[output.request_id])
        monkeypatch.undo()

    def outputs(self) -> list[tuple[list[int], str]]:
        return [(self.tokens[key], self.finish[key][0]) for key in sorted(self.tokens, key=int)]


def mixed_workload(engine: LLMEngine) -> list[tuple[list[int], str | None, SamplingParams]]:
    """Every prompt with every adapter, under a plain length limit, an odd one, a stop string and a stop token
    taken from early in its plain output (found by a run without speculation). Each prompt ends with the start of
    its own plain answer, in which the looping model is already repeating itself: prompt lookup can then draft
    the answer's first tokens from the prompt, so stops can land in its accepted runs too."""
    plain = SamplingParams(temperature=0.0, max_tokens=LENGTH, ignore_eos=True)
    pairs = [(prompt, name) for prompt in PROMPTS for name in ADAPTERS]
    adapters = [engine.adapters.resolve(name) if name else None for _, name in pairs]
    starts = engine.generate([prompt for prompt, _ in pairs], dataclasses.replace(plain, max_tokens=PRIMING),
                             adapters)
    pairs = [(prompt + start, name) for (prompt, name), start in zip(pairs, starts)]
    references = engine.generate([prompt for prompt, _ in pairs], plain,
                                 [engine.adapters.resolve(name) if name else None for _, name in pairs])
    workload = []
    for (prompt, name), reference in zip(pairs, references):
        stop_text = engine.tokenizer.decode(reference[5:7])
        workload += [(prompt, name, plain), (prompt, name, dataclasses.replace(plain, max_tokens=LENGTH - 3)),
                     (prompt, name, dataclasses.replace(plain, stop=[stop_text] if stop_text.strip() else [])),
                     (prompt, name, dataclasses.replace(plain, stop_token_ids=[reference[6]]))]
    return workload


def assert_everything_returned(engine: LLMEngine) -> None:
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.adapters.num_references() == 0 and engine.adapters.num_pins() == 0
    others = engine.speculation.proposer.others  # what proposes for requests without Medusa heads
    assert not getattr(others, "histories", None)  # prompt lookup keeps nothing of finished requests
    proposer_blocks = getattr(others, "block_manager", None)
    if proposer_blocks is not None:
        assert proposer_blocks.num_free_blocks == proposer_blocks.num_blocks
        assert not others.shadows


@pytest.mark.parametrize("proposer", ["prompt lookup", "draft model", "target as draft", "medusa heads"])
@pytest.mark.parametrize("settings", [{}, {"max_num_batched_tokens": 24, "num_kv_blocks": 160}],
                         ids=["roomy", "tight budget and cache"])
def test_greedy_outputs_equal_plain_decoding(make_engine, proposers, proposer, settings, monkeypatch):
    plain_engine = make_engine(**settings)
    workload = mixed_workload(plain_engine)
    expected = Run(plain_engine, workload, monkeypatch).outputs()
    engine = make_engine(spec_tokens=4, **proposers[proposer], **settings)
    run = Run(engine, workload, monkeypatch)
    assert run.outputs() == expected
    metrics = engine.metrics
    assert 0 < metrics.spec_accepted_tokens._value.get() <= metrics.spec_draft_tokens._value.get()
    stopped_inside = [key for key, (reason, returned, verified) in run.finish.items()
                      if reason == "stop" and returned < verified]
    limited_in_run = [key for key, (reason, returned, _) in run.finish.items() if reason == "length" and returned > 1]
    assert stopped_inside and limited_in_run  # the cases this test is about did happen
    assert_everything_returned(engine)


def test_rejections_and_aborts_leak_no_block(make_engine, proposers):
    engine = make_engine(spec_tokens=4, num_kv_blocks=96, **proposers["draft model"])
    params = SamplingParams(temperature=0.8, max_tokens=LENGTH, ignore_eos=True, seed=7)
    for index, prompt in enumerate(PROMPTS * 3):
        name = ADAPTERS[index % len(ADAPTERS)]
        engine.add_request(str(index), prompt, params, engine.adapters.resolve(name) if name else None)
    for step in range(12):
        engine.step()
        if step % 3 == 2:  # abort a running request that holds drafts' blocks in both caches
            shadows = engine.speculation.proposer.others.shadows
            victim = next(s for s in engine.scheduler.running if shadows.get(s.request_id))
            engine.abort_request(victim.request_id)
    while engine.has_unfinished_requests():
        engine.step()
    metrics = engine.metrics
    assert metrics.spec_accepted_tokens._value.get() < metrics.spec_draft_tokens._value.get()  # rejections
    assert metrics.requests_finished.labels(finished_reason="abort")._value.get() == 4
    assert_everything_returned(engine)


def test_requests_can_turn_speculation_off(make_engine):
    engine = make_engine(spec_tokens=4)
    params = SamplingParams(temperature=0.0, max_tokens=LENGTH, ignore_eos=True)
    expected = make_engine().generate(PROMPTS, params)
    assert engine.generate(PROMPTS, dataclasses.replace(params, speculative=False)) == expected
    assert engine.metrics.spec_drafts._value.get() == 0
    assert engine.generate(PROMPTS, params) == expected
    assert engine.metrics.spec_drafts._value.get() > 0


def test_a_draft_model_must_share_the_vocabulary(target, tmp_path):
    other = load_model(str(save_looping_llama(tmp_path, seed=1, vocab_size=400)), torch.device("cpu"),
                       torch.float32)
    with pytest.raises(ValueError, match="vocabulary"):
        LLMEngine(target, ServerConfig(block_size=4, num_kv_blocks=64, spec_tokens=2), draft=other)
    with pytest.raises(ValueError, match="spec-tokens"):
        LLMEngine(target, ServerConfig(block_size=4, num_kv_blocks=64), draft=target)


def test_the_draft_cache_comes_out_of_the_same_kv_memory(target):
    alone = LLMEngine(target, ServerConfig(block_size=4, kv_cache_memory=1 << 20))
    with_draft = LLMEngine(target, ServerConfig(block_size=4, kv_cache_memory=1 << 20, spec_tokens=2), draft=target)
    assert with_draft.block_manager.num_blocks == alone.block_manager.num_blocks // 2
    assert with_draft.speculation.proposer.others.block_manager.num_blocks == with_draft.block_manager.num_blocks
