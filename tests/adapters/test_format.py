import math
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from loraserve.adapters.errors import AdapterFormatError, AdapterNotFoundError, AdapterTooLargeError
from loraserve.adapters import format
from loraserve.adapters.format import inspect_adapter, load_adapter
from loraserve.adapters.lora_format import load_lora
from loraserve.adapters.slot_pool import SlotPool
from loraserve.kernels import cpu_adapter_copy
from tests.adapters.helpers import (BASE, CONFIG, WEIGHTS, edit_config, make_peft_model, read_tensors, tensor_name,
                                    write_tensors)

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("use_rslora", [False, True])
def test_loads_peft_adapter_with_peft_scale(make_adapter: Callable[..., Path], use_rslora: bool) -> None:
    directory = make_adapter(rank=4, alpha=8, use_rslora=use_rslora)
    adapter = load_adapter(directory, BASE, max_rank=8)
    peft_scale = make_peft_model(rank=4, alpha=8, use_rslora=use_rslora).base_model.model.model.layers[0] \
        .self_attn.q_proj.scaling["default"]
    assert adapter.scale == pytest.approx(peft_scale)
    assert adapter.scale == pytest.approx(8 / math.sqrt(4) if use_rslora else 8 / 4)
    assert (adapter.rank, adapter.alpha, adapter.targets) == (4, 8.0, ["q_proj", "v_proj"])
    tensors = read_tensors(directory)
    assert set(adapter.weights) == {(0, "q_proj"), (0, "v_proj"), (1, "q_proj"), (1, "v_proj")}
    lora_a, lora_b = adapter.weights[(1, "v_proj")]
    assert lora_a.dtype == lora_b.dtype == torch.float32
    assert torch.equal(lora_a, tensors[tensor_name(1, "v_proj", "A")])
    assert torch.equal(lora_b, tensors[tensor_name(1, "v_proj", "B")])
    assert adapter.size_bytes == sum(tensor.numel() * 4 for tensor in tensors.values())
    assert inspect_adapter(directory, BASE, max_rank=8) == adapter.info()


def test_regex_targets_and_layers_to_transform_match_what_peft_adapted(make_adapter: Callable[..., Path]) -> None:
    regex = make_adapter(targets=r".*\.(k_proj|down_proj)")
    assert load_adapter(regex, BASE, max_rank=8).targets == ["k_proj", "down_proj"]
    one_layer = make_adapter(targets=ALL_TARGETS, layers_to_transform=[1])
    adapter = load_adapter(one_layer, BASE, max_rank=8)
    assert adapter.targets == ALL_TARGETS
    assert set(adapter.weights) == {(1, target) for target in ALL_TARGETS}


def test_half_precision_weights_reach_the_pool_exactly(make_adapter: Callable[..., Path]) -> None:
    """Kept as stored when read (the slot pool converts whole projections at once), then float32 in the pages."""
    directory = make_adapter()
    original = read_tensors(directory)
    write_tensors(directory, {name: tensor.to(torch.bfloat16) for name, tensor in original.items()})
    adapter = load_adapter(directory, BASE, max_rank=8)
    assert adapter.weights[(0, "q_proj")][0].dtype == torch.bfloat16
    pool = SlotPool(BASE, 1, adapter.rank, 8, torch.device("cpu"), torch.float32)
    pages = pool.take_pages(adapter.rank)
    pool.write(0, pages, adapter)
    q_rows = pool.layer_weights[0]["qkv_proj"].lora_a[pages, 0]  # [rank, in]: q's A rows
    assert q_rows.dtype == torch.float32
    assert torch.equal(q_rows, original[tensor_name(0, "q_proj", "A")].to(torch.bfloat16).float())


def _retensor(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def mutate(directory: Path) -> None:
        tensors = read_tensors(directory)
        change(tensors)
        write_tensors(directory, tensors)
    return mutate


def _rename(tensors: dict[str, torch.Tensor], old: str, new: str) -> None:
    tensors[new] = tensors.pop(old)


Q_A = tensor_name(0, "q_proj", "A")
BROKEN_ADAPTERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "corrupt": (lambda d: (d / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json"),
                "not a readable safetensors file"),
    "truncated": (lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:-64]), "not a readable safetensors"),
    "wrong shape": (_retensor(lambda t: t.update({Q_A: torch.zeros(4, 65)})), f"{Q_A}' has shape [4, 65]"),
    "wrong key": (_retensor(lambda t: _rename(t, Q_A, Q_A.replace("lora_A", "lora_X"))), "unexpected tensor"),
    "extra tensor": (_retensor(lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(1)})),
                     "unexpected tensor 'base_model.model.lm_head.weight'"),
    "missing B": (_retensor(lambda t: t.pop(tensor_name(1, "v_proj", "B"))),
                  f"missing tensor {tensor_name(1, 'v_proj', 'B')}"),
    "layer beyond base": (_retensor(lambda t: _rename(t, Q_A, Q_A.replace("layers.0", "layers.5"))), "layer 5"),
    "untargeted tensor": (_retensor(lambda t: t.update({tensor_name(0, "o_proj", "A"): torch.zeros(4, 64)})),
                          "do not target"),
    "int8 tensor": (_retensor(lambda t: t.update({Q_A: t[Q_A].to(torch.int8)})), "dtype I8"),
    "NaN": (_retensor(lambda t: t[Q_A].view(-1)[3:4].fill_(math.nan)), "NaN"),
    "missing config": (lambda d: (d / CONFIG).unlink(), "missing adapter_config.json"),
    "config not JSON": (lambda d: (d / CONFIG).write_text("{r: 4"), "not readable JSON"),
    "not LoRA": (lambda d: edit_config(d, peft_type="IA3"), "peft_type is 'IA3'"),
    "unknown target": (lambda d: edit_config(d, target_modules=["q_proj", "embed_tokens"]),
                       "target module 'embed_tokens' is not supported"),
    "regex matches nothing": (lambda d: edit_config(d, target_modules=".*lm_head"), "matches none"),
    "DoRA without magnitudes": (lambda d: edit_config(d, use_dora=True), "lora_magnitude_vector"),
    "magnitude without DoRA": (_retensor(lambda t: t.update({Q_A.replace("lora_A.weight", "lora_magnitude_vector"):
                                                             torch.ones(64)})), "does not set use_dora"),
    "bias": (lambda d: edit_config(d, bias="all"), "bias='all'"),
    "modules_to_save": (lambda d: edit_config(d, modules_to_save=["lm_head"]), "modules_to_save"),
    "rank_pattern rank zero": (lambda d: edit_config(d, rank_pattern={"q_proj": 0}), "rank_pattern must map"),
    "rank_pattern bad regex": (lambda d: edit_config(d, rank_pattern={"q_proj[": 2}), "not a valid regex"),
    "alpha_pattern negative": (lambda d: edit_config(d, alpha_pattern={"v_proj": -1}), "alpha_pattern must map"),
    "rank_pattern wrong shape": (lambda d: edit_config(d, rank_pattern={"q_proj": 2}), "expected [2, 64]"),
    "rank zero": (lambda d: edit_config(d, r=0), "r must be a positive integer"),
    "alpha missing": (lambda d: edit_config(d, lora_alpha=None), "lora_alpha"),
    "layer out of range": (lambda d: edit_config(d, layers_to_transform=[2]), "layers_to_transform [2]"),
}


@pytest.mark.parametrize("case", BROKEN_ADAPTERS)
def test_broken_adapter_is_refused_with_a_telling_message(make_adapter: Callable[..., Path], case: str) -> None:
    directory = make_adapter()
    load_adapter(directory, BASE, max_rank=8)  # valid before the change
    mutate, message = BROKEN_ADAPTERS[case]
    mutate(directory)
    with pytest.raises(AdapterFormatError, match=re.escape(message)):
        load_adapter(directory, BASE, max_rank=8)


def test_a_file_cut_short_while_it_is_read_fails_that_load_alone(make_adapter: Callable[..., Path]) -> None:
    """Rewritten in place between its header check and its read: a short read names the tensor it ends in (a
    memory-mapped read would have ended the process with SIGBUS)."""
    directory = make_adapter()
    layout = format._inspect(directory, BASE, max_rank=8)
    data = (directory / WEIGHTS).read_bytes()
    (directory / WEIGHTS).write_bytes(data[:len(data) - 64])
    with pytest.raises(AdapterFormatError, match="the file ends inside tensor"):
        load_lora(layout, directory / WEIGHTS)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("check", ["C++", "torch"])
def test_a_non_finite_weight_is_named_by_either_check(make_adapter: Callable[..., Path], bad: float, check: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The C++ check, and the torch one used until it is built, name the first tensor holding the bad value."""
    if check == "torch":
        monkeypatch.setattr(cpu_adapter_copy.KERNEL, "module", None)
    directory = make_adapter()
    name = tensor_name(1, "v_proj", "B")
    _retensor(lambda tensors: tensors[name].view(-1)[-1:].fill_(bad))(directory)
    with pytest.raises(AdapterFormatError, match=re.escape(f"tensor '{name}' holds NaN or infinite values")):
        load_adapter(directory, BASE, max_rank=8)


def test_adapters_made_by_peft_with_unsupported_features_are_refused(make_adapter: Callable[..., Path]) -> None:
    with pytest.raises(AdapterFormatError, match="modules_to_save"):
        load_adapter(make_adapter(modules_to_save=["lm_head"]), BASE, max_rank=8)
    with pytest.raises(AdapterFormatError, match="'embed_tokens' is not supported"):
        load_adapter(make_adapter(targets=["embed_tokens"]), BASE, max_rank=8)


def test_dora_adapters_load_with_their_magnitudes_and_take_a_page_more(make_adapter: Callable[..., Path]) -> None:
    adapter = load_adapter(make_adapter(use_dora=True), BASE, max_rank=8)
    assert adapter.use_dora and adapter.num_pages == adapter.rank + 1
    assert set(adapter.magnitudes) == set(adapter.weights)
    assert all(magnitude.shape == (BASE.module_shapes[target][1],)
               for (_, target), magnitude in adapter.magnitudes.items())


def test_rank_above_max_rank_is_too_large(make_adapter: Callable[..., Path]) -> None:
    directory = make_adapter(rank=4)
    with pytest.raises(AdapterTooLargeError, match="rank 4 exceeds the server's max LoRA rank 2"):
        inspect_adapter(directory, BASE, max_rank=2)


def test_inspect_reads_no_tensor_data(make_adapter: Callable[..., Path]) -> None:
    directory = make_adapter()
    BROKEN_ADAPTERS["NaN"][0](directory)
    inspect_adapter(directory, BASE, max_rank=8)
    with pytest.raises(AdapterFormatError):
        load_adapter(directory, BASE, max_rank=8)


class _Trap:
    """Unpickling this makes a directory: proof that something unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return os.mkdir, (str(self.path),)


def test_pickled_weights_are_refused_unread(make_adapter: Callable[..., Path], tmp_path: Path) -> None:
    directory, marker = make_adapter(), tmp_path / "unpickled"
    (directory / WEIGHTS).unlink()
    (directory / "adapter_model.bin").write_bytes(pickle.dumps({"weights": _Trap(marker)}))
    with pytest.raises(AdapterFormatError, match="adapter_model.bin holds pickled weights, which are refused"):
        load_adapter(directory, BASE, max_rank=8)
    assert not marker.exists()
    pickle.loads((directory / "adapter_model.bin").read_bytes())
    assert marker.exists()  # the trap works: had the loader unpickled it, the check above would have failed


def test_missing_directory_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(AdapterNotFoundError):
        load_adapter(tmp_path / "absent", BASE, max_rank=8)
