"""Adapters in the engine against PEFT: one mixed batch, every request with its own adapter (or none)."""
import threading
import time
from pathlib import Path

import pytest
import torch

import loraserve.adapters.registry as registry_module
from loraserve.config import ServerConfig
from loraserve.engine.engine import IDLE_WAIT_SECONDS, LOADING_PREFILL_TOKENS, LLMEngine
from loraserve.engine.sampling_params import SamplingParams
from loraserve.model.loader import load_model
from loraserve.model.quantization import quantize
from tests.api.lora_helpers import peft_greedy, peft_model, save_random_adapter
from tests.model.helpers import save_tiny_llama

ADAPTERS = {
    "attention-r4": dict(rank=4, lora_alpha=8, targets=["q_proj", "v_proj"]),
    "everything-r8": dict(rank=8, lora_alpha=16),
    "mlp-rslora-r16": dict(rank=16, lora_alpha=4, use_rslora=True, targets=["gate_proj", "down_proj"]),
    "kv-r2": dict(rank=2, lora_alpha=2, targets=["k_proj", "v_proj", "up_proj"]),
    # PEFT's per-module patterns: q at rank 4 and v at 8 in one fused projection, one layer's down_proj at 16, and
    # alphas by module ("layers.1.mlp.down_proj" matches at a dot, as PEFT's get_pattern_key does).
    "patterns-r8": dict(rank=8, lora_alpha=16, rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 16},
                        alpha_pattern={"v_proj": 32, "up_proj": 3, "down_proj": 5}),
    # DoRA: q and v share a fused projection with k, which it leaves alone; gate shares one with up.
    "dora-r4": dict(rank=4, lora_alpha=8, use_dora=True, targets=["q_proj", "v_proj", "gate_proj", "down_proj"]),
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
    config = ServerConfig(block_size=4, num_kv_blocks=256, max_loras=6, max_lora_rank=16,
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
            engine.adapters.make_resident(adapter)  # so one step holds them all
        engine.add_request(str(index), prompt, SamplingParams(temperature=0.0, max_tokens=1), adapter)
    batch = engine.scheduler.schedule()
    assert len(batch.sequences) == len(requests)  # one step holds them all
    logits, sampling, _, _ = engine.runner.execute(batch)
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
    assert (outputs, len(ADAPTERS)) == run(engine)
    assert most_adapters == 2
    assert two_slots.adapters.num_references() == 0 and two_slots.adapters.num_pins() == 0


def test_no_step_waits_for_an_adapter_read(model_dir, adapter_dirs, tmp_path, monkeypatch):
    """The adapter's memory copy was evicted and its read from disk hangs: steps go on (the base request beside
    it finishes), and once the read returns the request runs with PEFT's answer."""
    loaded = load_model(str(model_dir), torch.device("cpu"), torch.float32)
    engine = LLMEngine(loaded, ServerConfig(block_size=4, num_kv_blocks=256, max_loras=2, max_lora_rank=16,
                                            max_cpu_loras=1, adapter_dir=str(tmp_path)))
    engine.adapters.add_from_path("slow", adapter_dirs["attention-r4"])
    engine.adapters.add_from_path("other", adapter_dirs["kv-r2"])  # the one memory copy is now `other`'s
    reading, release = threading.Event(), threading.Event()
    read = registry_module.load_adapter

    def hanging_read(*args):
        reading.set()
        release.wait()
        return read(*args)
    monkeypatch.setattr(registry_module, "load_adapter", hanging_read)
    prompt, params = PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    engine.add_request("slow", prompt, params, engine.adapters.resolve("slow"))
    engine.add_request("base", prompt, params)
    outputs: dict[str, list[int]] = {"slow": [], "base": []}
    longest_step, deadline = 0.0, time.monotonic() + 30
    while (len(outputs["base"]) < 6 or not reading.is_set()) and time.monotonic() < deadline:
        started = time.monotonic()
        for output in engine.step():
            outputs[output.request_id].extend(output.token_ids)
        longest_step = max(longest_step, time.monotonic() - started)
    assert reading.is_set() and len(outputs["base"]) == 6 and outputs["slow"] == []
    assert longest_step < 1.0 and engine.adapters.waiting_for_load() == 1
    release.set()
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs[output.request_id].extend(output.token_ids)
    assert outputs["slow"] == peft_greedy(model_dir, adapter_dirs["attention-r4"], prompt, 6)
    assert engine.adapters.num_references() == 0 and engine.adapters.num_pins() == 0


def test_an_adapter_load_starts_when_its_request_is_queued(model_dir, adapter_dirs, tmp_path, monkeypatch):
    """Before any step reaches the request (behind 240 prompt tokens) its adapter is being read; while it is,
    steps keep their prompt chunks short (they run on one core fewer, and give it back soon after)."""
    loaded = load_model(str(model_dir), torch.device("cpu"), torch.float32)
    engine = LLMEngine(loaded, ServerConfig(block_size=4, num_kv_blocks=256, max_cpu_loras=1,
                                            adapter_dir=str(tmp_path)))
    engine.adapters.add_from_path("late", adapter_dirs["attention-r4"])
    engine.adapters.add_from_path("other", adapter_dirs["kv-r2"])  # the one memory copy is now `other`'s
    reading, release = threading.Event(), threading.Event()
    read = registry_module.load_adapter
    monkeypatch.setattr(registry_module, "load_adapter", lambda *args: (reading.set(), release.wait(),
                                                                         read(*args))[2])
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    for index in range(4):
        engine.add_request(f"base-{index}", list(range(10 + index, 70 + index)), params)
    engine.add_request("late", PROMPTS[1], params, engine.adapters.resolve("late"))
    assert reading.wait(10)
    engine.step()
    assert sum(sequence.num_computed_tokens for sequence in engine.sequences.values()) == LOADING_PREFILL_TOKENS
    release.set()
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.adapters.num_references() == 0 and engine.adapters.num_pins() == 0


def test_a_step_with_nothing_to_run_waits_for_the_load_instead_of_spinning(model_dir, adapter_dirs, tmp_path,
                                                                            monkeypatch):
    """While the only request waits for its adapter's read, each step waits for news (a caller stepping in a
    loop would otherwise hold the interpreter from the loader it waits for); the placement wakes it."""
    loaded = load_model(str(model_dir), torch.device("cpu"), torch.float32)
    engine = LLMEngine(loaded, ServerConfig(block_size=4, num_kv_blocks=256, max_cpu_loras=1,
                                            adapter_dir=str(tmp_path)))
    engine.adapters.add_from_path("slow", adapter_dirs["attention-r4"])
    engine.adapters.add_from_path("other", adapter_dirs["kv-r2"])
    release = threading.Event()
    read = registry_module.load_adapter
    monkeypatch.setattr(registry_module, "load_adapter", lambda *args: (release.wait(), read(*args))[1])
    engine.add_request("slow", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=1),
                       engine.adapters.resolve("slow"))
    threading.Timer(0.5, release.set).start()
    empty_steps = 0
    while not engine.step():
        empty_steps += 1
    assert release.is_set() and 0 < empty_steps <= 0.5 / IDLE_WAIT_SECONDS + 5


def dequantized_peft_model(model_dir: Path, adapter_dir: Path | None, bits: int) -> torch.nn.Module:
    """PEFT over the base model whose layers' projections are replaced by what their quantized codes stand for,
    and its head by what its int8 codes stand for (its own copy: the input embedding stays float)."""
    model = peft_model(model_dir, adapter_dir)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name and "lora_" not in name:
                module.weight.copy_(quantize(module.weight, bits).dequantize())
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(quantize(head.weight, 8).dequantize())
    return model


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_adapters_on_a_quantized_base_equal_peft_on_its_dequantized_weights(model_dir, adapter_dirs, tmp_path,
                                                                           quantization):
    """Adapters stay in float32 over an int4/int8 base (QLoRA-style serving). The kernels multiply in bfloat16,
    so logits agree to 4% of their largest magnitude rather than 1e-4: well inside what each adapter changes."""
    loaded = load_model(str(model_dir), torch.device("cpu"), torch.float32, quantization)
    engine = LLMEngine(loaded, ServerConfig(block_size=4, num_kv_blocks=64, max_lora_rank=16,
                                            adapter_dir=str(tmp_path / "registry")))
    names = [None, *ADAPTERS]
    for name in ADAPTERS:
        engine.adapters.add_from_path(name, adapter_dirs[name])
    for index, name in enumerate(names):
        adapter = engine.adapters.resolve(name) if name else None
        if adapter:
            engine.adapters.make_resident(adapter)
        engine.add_request(str(index), PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=1), adapter)
    logits = engine.runner.execute(engine.scheduler.schedule()).logits
    expected = []
    for name in names:
        with torch.no_grad():
            bits = {"int4": 4, "int8": 8}[quantization]
            model = dequantized_peft_model(model_dir, adapter_dirs[name] if name else None, bits)
            expected.append(model(torch.tensor([PROMPTS[1]])).logits[0, -1])
    for row, name in enumerate(names):
        tolerance = 0.04 * expected[row].abs().max()
        assert (logits[row] - expected[row]).abs().max() < tolerance, name
        assert logits[row].argmax() == expected[row].argmax(), name
        if name:
            assert (expected[row] - expected[0]).abs().max() > 3 * tolerance, f"{name} barely changes the output"
