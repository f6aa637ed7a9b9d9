"""Prompt and prefix tuning adapters as PEFT saves them: read into the virtual tokens the engine uses, and refused
with a message naming the problem when they do not fit the base model or are not what a decoder serves."""
import math
import re
from pathlib import Path

import pytest
import torch

from loraserve.adapters.adapter_info import PREFIX_TUNING, PROMPT_TUNING
from loraserve.adapters.errors import AdapterFormatError
from loraserve.adapters.format import inspect_adapter, load_adapter
from tests.adapters.helpers import (BASE, MakeRegistry, edit_config, read_tensors, save_peft_prompt_learning,
                                    write_tensors)

TENSOR = "prompt_embeddings"


@pytest.mark.parametrize("options", [{}, {"prefix_projection": True, "encoder_hidden_size": 16}])
def test_prefix_tuning_is_read_as_each_layers_keys_and_values(tmp_path: Path, options: dict) -> None:
    """PEFT views a token's row as [layers x 2, key/value heads, head size]: layer l's keys at 2l, values at 2l+1."""
    directory = save_peft_prompt_learning(tmp_path, "PREFIX_TUNING", num_virtual_tokens=5, **options)
    adapter = load_adapter(directory, BASE, max_rank=8)
    assert (adapter.kind, adapter.num_virtual_tokens, adapter.num_pages) == (PREFIX_TUNING, 5, 0)
    stored = read_tensors(directory)[TENSOR].view(5, 2 * 2, 2, 16)
    for layer in range(2):
        for index in range(2):  # keys, values
            expected = stored[:, 2 * layer + index].reshape(5, 32)
            assert torch.equal(adapter.virtual_tokens.key_values[layer, index], expected)
    assert adapter.virtual_tokens.embeddings is None


@pytest.mark.parametrize("init", ["RANDOM", "SAMPLE_VOCAB"])
def test_prompt_tuning_is_read_as_its_embeddings(tmp_path: Path, init: str) -> None:
    directory = save_peft_prompt_learning(tmp_path, "PROMPT_TUNING", num_virtual_tokens=7, prompt_tuning_init=init)
    info = inspect_adapter(directory, BASE, max_rank=8)
    assert (info.kind, info.num_virtual_tokens, info.rank, info.size_bytes) == (PROMPT_TUNING, 7, 0, 7 * 64 * 4)
    adapter = load_adapter(directory, BASE, max_rank=8)
    assert torch.equal(adapter.virtual_tokens.embeddings, read_tensors(directory)[TENSOR])


def _retensor(change):
    def mutate(directory: Path) -> None:
        tensors = read_tensors(directory)
        change(tensors)
        write_tensors(directory, tensors)
    return mutate


BROKEN = {  # case: (peft_type, mutation, message)
    "another task": ("PROMPT_TUNING", lambda d: edit_config(d, task_type="SEQ_CLS"), "task_type is 'SEQ_CLS'"),
    "no virtual tokens": ("PROMPT_TUNING", lambda d: edit_config(d, num_virtual_tokens=0), "num_virtual_tokens"),
    "encoder-decoder": ("PROMPT_TUNING", lambda d: edit_config(d, num_transformer_submodules=2),
                        "num_transformer_submodules is 2"),
    "another model's width": ("PROMPT_TUNING", lambda d: edit_config(d, token_dim=128), "token_dim=128"),
    "unknown init": ("PROMPT_TUNING", lambda d: edit_config(d, prompt_tuning_init="MAGIC"), "prompt_tuning_init"),
    "modules_to_save": ("PROMPT_TUNING", lambda d: edit_config(d, modules_to_save=["lm_head"]), "modules_to_save"),
    "wrong shape": ("PROMPT_TUNING", _retensor(lambda t: t.update({TENSOR: torch.zeros(5, 63)})),
                    "has shape [5, 63], expected [5, 64]"),
    "extra tensor": ("PROMPT_TUNING", _retensor(lambda t: t.update({"extra": torch.zeros(1)})), "holds one tensor"),
    "NaN": ("PROMPT_TUNING", _retensor(lambda t: t[TENSOR].view(-1)[7:8].fill_(math.nan)), "NaN"),
    "another model's layers": ("PREFIX_TUNING", lambda d: edit_config(d, num_layers=3), "num_layers=3"),
    "prefix of another width": ("PREFIX_TUNING", _retensor(lambda t: t.update({TENSOR: torch.zeros(5, 64)})),
                                "expected [5, 128]"),
    "projection not a flag": ("PREFIX_TUNING", lambda d: edit_config(d, prefix_projection="yes"), "prefix_projection"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_prompt_learning_adapters_are_refused_by_what_is_wrong(tmp_path: Path, case: str) -> None:
    peft_type, mutate, message = BROKEN[case]
    directory = save_peft_prompt_learning(tmp_path, peft_type)
    load_adapter(directory, BASE, max_rank=8)  # valid before the change
    mutate(directory)
    with pytest.raises(AdapterFormatError, match=re.escape(message)):
        load_adapter(directory, BASE, max_rank=8)


def test_a_prompt_learning_adapter_takes_a_slot_and_no_pages(make_registry: MakeRegistry, tmp_path: Path) -> None:
    registry, pool = make_registry(num_slots=2, num_pages=4)
    registry.add("prompt", save_peft_prompt_learning(tmp_path / "prompt", "PROMPT_TUNING"))
    ref = registry.resolve("prompt")
    free_pages = pool.num_free_pages
    assert registry.make_resident(ref)
    slot = registry.hold(ref)
    assert pool.num_free_pages == free_pages and pool.virtual_tokens[slot].embeddings.shape == (5, 64)
    assert registry.record("prompt").kind == PROMPT_TUNING and registry.record("prompt").tier == "gpu"
    registry.release(ref)
    registry.unpin(ref)
    registry.remove("prompt")
    assert pool.virtual_tokens[slot] is None
