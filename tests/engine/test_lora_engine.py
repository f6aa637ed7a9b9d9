"""Adapters in the engine against PEFT: one mixed batch, every request with its own adapter (or none)."""
from pathlib import Path

import pytest
import torch
from server.config import ServerConfig
from server.engine.engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from server.model.loader import load_model
from tests.api.lora_helpers import peft_model, save_random_adapter
from tests.model.helpers import save_tiny_llama

ADAPTERS = {
    "attention-r4": dict(rank=4, lora_alpha=8, targets=["q_proj", "v_proj"]),
    "everything-r8": dict(rank=8, lora_alpha=16),
    "mlp-rslora-r16": dict(rank=16, lora_alpha=4, use_rslora=True, targets=["gate_proj", "down_proj"]),
    "kv-r2": dict(rank=2, lora_alpha=2, targets=["k_proj", "v_proj", "up_proj"]),
}
PROMPTS = [[5, 17, 42, 9], [100, 3, 3, 250, 61, 7, 11], [8] * 13, [300, 200, 100], [12, 13, 14, 15, 16, 17]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("lora-base"), seed=11)


@pytest.fixture(scope="module")
def adapter_dirs(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEFT adapters with non-zero B (init_lora_weights=False), saved as PEFT saves them."""
    return {name: save_random_adapter(model_dir, tmp_path_factory.mktemp(name), seed=100 + index, **settings)
            for index, (name, settings) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def engine(model_dir: Path, adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> LLMEngine:
    loaded = load_model(str(model_dir), torch.device("cpu"), torch.float32)
    config = ServerConfig(block_size=4, num_kv_blocks=256, max_loras=4, max_lora_rank=16,
                          adapter_dir=str(tmp_path_factory.mktemp("registry")))
    engine = LLMEngine(loaded, config)
    for name, directory in adapter_dirs.items():
        engine.adapters.add_from_path(name, directory)
    return engine


def batch_assignments() -> list[str | None]:
    """Each prompt runs with every adapter and with none, all mixed in one batch."""
    return [None, *ADAPTERS]


def test_mixed_batch_logits_equal_peft(engine, model_dir, adapter_dirs):
    requests = [(prompt, name) for prompt in PROMPTS for name in batch_assignments()]
    for index, (prompt, name) in enumerate(requests):
        adapter = engine.adapters.resolve(name) if name else None
        if adapter:
            engine.adapters.ensure_loaded(adapter)
        engine.add_request(str(index), prompt, SamplingParams(temperature=0.0, max_tokens=1), adapter)
    batch = engine.scheduler.schedule()
    assert len(batch.sequences) == len(requests)  # one step holds them all
    logits, sampling = engine.runner.execute(batch)
    assert sampling == list(range(len(requests)))

    for name in batch_assignments():
        model = peft_model(model_dir, adapter_dirs[name] if name else None)
        for row, (prompt, request_name) in enumerate(requests):
            if request_name == name:
                with torch.no_grad():
                    expected = model(torch.tensor([prompt])).logits[0, -1]
                assert torch.allclose(logits[row], expected, atol=1e-4, rtol=0), (name, prompt)
    for sequence in list(engine.scheduler.running):
        engine.abort_request(sequence.request_id)
    assert engine.adapters.num_references() == 0 and engine.adapters.num_pins() == 0


def test_mixed_batch_greedy_outputs_equal_peft_generate(engine, model_dir, adapter_dirs):
    requests = [(prompt, name) for prompt in PROMPTS for name in batch_assignments()]
    references = [engine.adapters.resolve(name) if name else None for _, name in requests]
    for reference in filter(None, references):
        engine.adapters.ensure_loaded(reference)
    outputs = engine.generate([prompt for prompt, _ in requests], SamplingParams(temperature=0.0, max_tokens=12),
                              references)
    by_request = dict(zip([(tuple(prompt), name) for prompt, name in requests], outputs))

    for name in batch_assignments():
        model = peft_model(model_dir, adapter_dirs[name] if name else None)
        for prompt in PROMPTS:
            generated = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)  # stops at EOS
            assert by_request[tuple(prompt), name] == generated[0, len(prompt):].tolist(), (name, prompt)
    for name in ADAPTERS:  # each adapter visibly changes some answer
        assert any(by_request[tuple(prompt), name] != by_request[tuple(prompt), None] for prompt in PROMPTS)
    assert engine.adapters.num_references() == 0 and engine.adapters.num_pins() == 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_more_adapters_than_slots_take_turns_with_the_same_outputs(engine, model_dir, adapter_dirs, tmp_path):
    requests = [(prompt, name) for prompt in PROMPTS for name in batch_assignments()]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    def run(target) -> tuple[list[list[int]], int]:
        """Outputs of every request, and the most distinct adapters that ran in one step."""
        references = [target.adapters.resolve(name) if name else None for _, name in requests]
        for index, ((prompt, _), reference) in enumerate(zip(requests, references)):
            if reference:
                target.adapters.ensure_loaded(reference)
            target.add_request(str(index), prompt, params, reference)
        outputs: list[list[int]] = [[] for _ in requests]
        most_adapters = 0
        while target.has_unfinished_requests():
            running_adapters = {s.adapter for s in target.scheduler.running if s.adapter is not None}
            most_adapters = max(most_adapters, len(running_adapters))
            for output in target.step():
                outputs[int(output.request_id)].extend(output.token_ids)
        return outputs, most_adapters

    loaded = load_model(str(model_dir), torch.device("cpu"), torch.float32)
    two_slots = LLMEngine(loaded, ServerConfig(block_size=4, num_kv_blocks=256, max_loras=2, max_lora_rank=16,
                                               adapter_dir=str(tmp_path)))
    for name, directory in adapter_dirs.items():
        two_slots.adapters.add_from_path(name, directory)
    outputs, most_adapters = run(two_slots)
    assert (outputs, 4) == run(engine)
    assert most_adapters == 2
    assert two_slots.adapters.num_references() == 0 and two_slots.adapters.num_pins() == 0
