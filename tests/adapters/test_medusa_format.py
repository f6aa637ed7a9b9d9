"""Medusa heads as Medusa and LoRAX save them load as saved, in both layouts; malformed ones are refused by what is
wrong, before any tensor is read where the header tells."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from benchmarks.train_medusa import save_medusa_heads
from loraserve.adapters.errors import AdapterFormatError, AdapterTooLargeError
from loraserve.adapters.medusa_format import has_medusa_heads, load_medusa_heads
from tests.adapters.helpers import BASE, acquire

HIDDEN, VOCAB = 8, 20


def random_heads(num_heads: int = 3, num_layers: int = 1, projected: bool = False, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(num_heads, num_layers, HIDDEN, HIDDEN, generator=generator),
            torch.randn(num_heads, num_layers, HIDDEN, generator=generator),
            torch.randn(num_heads, VOCAB, HIDDEN, generator=generator) if projected else None)


@pytest.mark.parametrize("projected", [False, True], ids=["LoRAX layout", "Medusa-1 layout"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_heads_load_as_saved(tmp_path: Path, projected: bool, num_layers: int) -> None:
    weights, biases, projections = random_heads(num_layers=num_layers, projected=projected)
    directory = save_medusa_heads(tmp_path, weights.bfloat16(), biases.bfloat16(),
                                  None if projections is None else projections.bfloat16())
    assert has_medusa_heads(directory)
    loaded = load_medusa_heads(directory, HIDDEN, VOCAB)
    assert loaded.num_heads == 3 and loaded.block_weights.dtype == torch.float32
    assert torch.equal(loaded.block_weights, weights.bfloat16().float())
    assert torch.equal(loaded.block_biases, biases.bfloat16().float())
    if projected:
        assert torch.equal(loaded.projections, projections.bfloat16().float())
    else:
        assert loaded.projections is None


def test_names_prefixed_as_part_of_a_whole_model_load_too(tmp_path: Path) -> None:
    directory = save_medusa_heads(tmp_path, *random_heads(projected=True))
    tensors = load_file(directory / "medusa_lm_head.safetensors")
    save_file({f"medusa_head.{name}": tensor for name, tensor in tensors.items()},
              directory / "medusa_lm_head.safetensors")
    assert torch.equal(load_medusa_heads(directory, HIDDEN, VOCAB).projections, random_heads(projected=True)[2])


def rewrite_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


def rewrite_tensors(directory: Path, change) -> None:
    path = directory / "medusa_lm_head.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


MALFORMED = {
    "no config": (lambda d: (d / "config.json").unlink(), "need config.json"),
    "no weights": (lambda d: (d / "medusa_lm_head.safetensors").unlink(), "need medusa_lm_head.safetensors"),
    "pickled weights": (lambda d: (d / "medusa_lm_head.safetensors").rename(d / "medusa_lm_head.pt"), "pickled"),
    "config not JSON": (lambda d: (d / "config.json").write_text("{heads: 3"), "not readable JSON"),
    "config a list": (lambda d: (d / "config.json").write_text("[3]"), "JSON object"),
    "no head count": (lambda d: rewrite_config(d, medusa_num_heads=None), "medusa_num_heads"),
    "zero heads": (lambda d: rewrite_config(d, medusa_num_heads=0), "medusa_num_heads"),
    "too many heads": (lambda d: rewrite_config(d, medusa_num_heads=17), "from 1 to 16"),
    "head count a string": (lambda d: rewrite_config(d, medusa_num_heads="3"), "medusa_num_heads"),
    "layers a boolean": (lambda d: rewrite_config(d, medusa_num_layers=True), "medusa_num_layers"),
    "fewer heads saved": (lambda d: rewrite_config(d, medusa_num_heads=4), "lacks tensor '3.0.linear.weight'"),
    "more heads saved": (lambda d: rewrite_config(d, medusa_num_heads=2), r"do not have: \['2.0.linear.bias'"),
    "a head without bias": (lambda d: rewrite_tensors(d, lambda t: t.pop("1.0.linear.bias")),
                            "lacks tensor '1.0.linear.bias'"),
    "a head without projection": (lambda d: rewrite_tensors(d, lambda t: t.pop("2.1.weight")),
                                  "lacks tensor '2.1.weight'"),
    "another hidden size": (lambda d: rewrite_tensors(d, lambda t: t.update({"0.0.linear.weight": torch.zeros(9, 9)})),
                            r"shape \[9, 9\], expected \[8, 8\] \(the base model's hidden size\)"),
    "another vocabulary": (lambda d: rewrite_tensors(d, lambda t: t.update({"1.1.weight": torch.zeros(21, HIDDEN)})),
                           "vocabulary and hidden size"),
    "integer weights": (lambda d: rewrite_tensors(d, lambda t: t.update(
        {"0.0.linear.bias": torch.zeros(HIDDEN, dtype=torch.int32)})), "dtype I32"),
    "NaN": (lambda d: rewrite_tensors(d, lambda t: t["2.0.linear.weight"].__setitem__((0, 0), float("nan"))),
            "'2.0.linear.weight' holds NaN"),
    "not safetensors": (lambda d: (d / "medusa_lm_head.safetensors").write_bytes(b"\x00" * 64),
                        "not a readable safetensors file"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_heads_are_refused_by_what_is_wrong(tmp_path: Path, case: str) -> None:
    directory = save_medusa_heads(tmp_path, *random_heads(projected=True))
    change, message = MALFORMED[case]
    change(directory)
    with pytest.raises(AdapterFormatError, match=message):
        load_medusa_heads(directory, HIDDEN, VOCAB)


def test_a_config_json_that_is_not_medusa_s_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    assert not has_medusa_heads(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 3}))
    assert has_medusa_heads(tmp_path)  # then refused for want of the weights (MALFORMED above)


def save_heads_for(directory: Path, projected: bool) -> Path:
    """Four heads for the registry tests' base (hidden 64, vocabulary 320)."""
    generator = torch.Generator().manual_seed(1)
    width, vocab = BASE.hidden_size, BASE.vocab_size
    return save_medusa_heads(directory, torch.randn(4, 1, width, width, generator=generator),
                             torch.randn(4, 1, width, generator=generator),
                             torch.randn(4, vocab, width, generator=generator) if projected else None)


def test_an_adapters_heads_hold_pages_of_the_pool_while_resident(make_registry, make_adapter) -> None:
    """Heads sit beside the pool but hold pages of it with their slot, so --adapter-memory bounds them too; the
    pages and the heads go when the slot does."""
    registry, pool = make_registry(num_slots=2, num_pages=40)
    directory = save_heads_for(make_adapter(rank=4), projected=False)
    expected = load_medusa_heads(directory, BASE.hidden_size, BASE.vocab_size).block_weights
    assert registry.add("heads", directory).num_medusa_heads == 4  # its files move into the store
    head_pages = -(-4 * (64 * 64 + 64) * 4 // pool.page_size)
    ref = registry.resolve("heads")
    slot = acquire(registry, ref)
    assert pool.num_free_pages == 40 - 4 - head_pages and head_pages > 1
    assert torch.equal(pool.medusa_heads[slot].block_weights, expected)
    registry.release(ref)
    registry.unpin(ref)
    registry.remove("heads")
    assert pool.num_free_pages == 40 and pool.medusa_heads[slot] is None


def test_heads_larger_than_the_adapter_memory_are_refused_at_upload(make_registry, make_adapter) -> None:
    registry, _ = make_registry(num_slots=2, num_pages=16)
    with pytest.raises(AdapterTooLargeError, match="for its Medusa heads.*--adapter-memory"):
        registry.add("huge-heads", save_heads_for(make_adapter(rank=4), projected=True))
    assert not registry.records()
