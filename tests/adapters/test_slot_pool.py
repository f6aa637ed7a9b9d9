"""Slots and pages written by the pool, run through the LoRA reference, against y = s * x A^T B^T computed from
PEFT's own files."""
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from loraserve.adapters.adapter_info import BaseModelShape
from loraserve.adapters.format import load_adapter
from loraserve.adapters.lora_format import LoraAdapter
from loraserve.adapters.slot_pool import SlotPool, page_bytes
from loraserve.kernels import cpu_adapter_copy
from loraserve.kernels.lora import LoraMapping, add_lora_reference
from tests.adapters.helpers import BASE, read_tensors, tensor_name

# The model's fused projections and their slices, written out here rather than taken from the code under test.
PROJECTIONS = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "o_proj": ["o_proj"],
               "gate_up_proj": ["gate_proj", "up_proj"], "down_proj": ["down_proj"]}
MAX_RANK = 8
# slot -> (PEFT settings, scale as PEFT defines it); slot 1 stays empty.
SLOTS = {
    0: (dict(seed=1, rank=2, alpha=4, targets=("q_proj", "v_proj")), 4 / 2),
    2: (dict(seed=2, rank=4, alpha=16, targets=tuple(BASE.module_shapes)), 16 / 4),
    3: (dict(seed=3, rank=8, alpha=8, targets=("k_proj", "o_proj", "gate_proj", "down_proj"), use_rslora=True,
             layers_to_transform=[1]), 8 / math.sqrt(8)),
}
TOKEN_SLOTS = [-1, 0, 2, 3, 0, -1, 2, 3, 3, 1, 0, 2]


def reference_delta(tensors: dict[str, torch.Tensor], scale: float, layer: int, projection: str,
                    x: torch.Tensor) -> torch.Tensor:
    """float64 delta of one adapter on one fused projection; an untargeted slice adds nothing."""
    parts = []
    for target in PROJECTIONS[projection]:
        in_features, out_features = BASE.module_shapes[target]
        name_a, name_b = tensor_name(layer, target, "A"), tensor_name(layer, target, "B")
        if name_a in tensors:
            parts.append(scale * x @ tensors[name_a].double().T @ tensors[name_b].double().T)
        else:
            parts.append(torch.zeros(x.shape[0], out_features, dtype=torch.float64))
    return torch.cat(parts, dim=1)


def make_pool(num_slots: int, num_pages: int, dtype: torch.dtype = torch.float32) -> SlotPool:
    return SlotPool(BASE, num_slots=num_slots, num_pages=num_pages, max_rank=MAX_RANK, device=torch.device("cpu"),
                    dtype=dtype)


def test_written_slots_give_each_token_its_adapters_delta(saved_adapter: Callable[..., Path]) -> None:
    pool = make_pool(num_slots=4, num_pages=32)
    directories = {slot: saved_adapter(**settings) for slot, (settings, _) in SLOTS.items()}
    overwritten = load_adapter(directories[3], BASE, MAX_RANK)
    pages = pool.take_pages(overwritten.rank)
    pool.write(0, pages, overwritten)  # rewritten below: must leave no trace
    pool.clear(0)
    pool.return_pages(pages)
    for slot, directory in directories.items():
        adapter = load_adapter(directory, BASE, MAX_RANK)
        pool.write(slot, pool.take_pages(adapter.rank), adapter)
    mapping = LoraMapping.from_token_slots(TOKEN_SLOTS, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    for layer in range(BASE.num_layers):
        for projection, targets in PROJECTIONS.items():
            in_features = BASE.module_shapes[targets[0]][0]
            x = torch.randn(len(TOKEN_SLOTS), in_features, generator=generator, dtype=torch.float64)
            output = torch.zeros(len(TOKEN_SLOTS), sum(BASE.module_shapes[target][1] for target in targets))
            add_lora_reference(output, x.float(), pool.layer_weights[layer][projection], mapping)
            expected = torch.zeros(output.shape, dtype=torch.float64)
            for row, slot in enumerate(TOKEN_SLOTS):
                if slot in SLOTS:
                    expected[row] = reference_delta(read_tensors(directories[slot]), SLOTS[slot][1], layer,
                                                    projection, x[row:row + 1])[0]
            torch.testing.assert_close(output.double(), expected, atol=1e-5, rtol=1e-5)
            assert output.abs().max() > 0.1  # the comparison is not between zeros


def test_adapters_take_pages_by_rank_and_a_cleared_slot_reads_only_zeros(saved_adapter: Callable[..., Path]) -> None:
    pool = make_pool(num_slots=3, num_pages=12)
    small = load_adapter(saved_adapter(rank=2, targets=tuple(BASE.module_shapes)), BASE, MAX_RANK)
    large = load_adapter(saved_adapter(rank=8, targets=tuple(BASE.module_shapes)), BASE, MAX_RANK)
    pool.write(0, pool.take_pages(2), small)
    pool.write(1, pool.take_pages(8), large)
    assert pool.num_free_pages == 2
    assert pool.slot_pages[0, 2:].eq(0).all() and pool.slot_pages[1].ne(0).all()
    pool.clear(1)
    qkv = pool.layer_weights[0]["qkv_proj"]
    assert qkv.ranks[:2] == [2, 0] and not qkv.lora_a[pool.slot_pages[1]].any()
    assert qkv.lora_a[pool.slot_pages[0, :2]].any()


def test_page_bytes_and_shapes_follow_the_base_model() -> None:
    pool = make_pool(num_slots=3, num_pages=5, dtype=torch.bfloat16)
    qkv = pool.layer_weights[1]["qkv_proj"]
    assert len(pool.layer_weights) == BASE.num_layers and pool.num_free_pages == 5
    assert qkv.lora_a.shape == (6, 3, 64) and qkv.lora_b.shape == (6, 64 + 32 + 32)
    assert qkv.slice_sizes == [64, 32, 32] and qkv.lora_a.dtype == torch.bfloat16
    assert pool.layer_weights[0]["down_proj"].lora_a.shape == (6, 1, 128)
    per_layer = (3 * 64 + 128) + (64 + 64) + (2 * 64 + 256) + (128 + 64)
    assert page_bytes(BASE, torch.bfloat16) == per_layer * BASE.num_layers * 2


def random_adapter(base: BaseModelShape, rank: int, modules: list[tuple[int, str]], seed: int) -> LoraAdapter:
    generator = torch.Generator().manual_seed(seed)
    weights = {(layer, target): (torch.randn(rank, base.module_shapes[target][0], generator=generator),
                                 torch.randn(base.module_shapes[target][1], rank, generator=generator))
               for layer, target in modules}
    return LoraAdapter(rank=rank, alpha=2.0 * rank, use_rslora=False, targets=sorted({t for _, t in modules}),
                       size_bytes=0, weights=weights)


@pytest.mark.parametrize("every_layer", [True, False], ids=["as on CUDA", "as on the CPU"])
def test_pages_split_into_runs_and_layers_with_gaps_hold_exactly_the_new_adapter(every_layer: bool) -> None:
    """Pages reused out of order (two runs), after an adapter of every layer and target left them dirty, and an
    adapter of layers 0, 2 and 3 only: every page a kernel reads must hold its A rows and scaled B columns or
    zeros. The CUDA kernels read a slot's pages in every layer, adapted or not; the CPU ones only in layers where
    the slot's rank is non-zero, so there the others may keep what they held."""
    base = BaseModelShape.for_llama(num_layers=4, hidden_size=64, intermediate_size=128, num_heads=4,
                                    num_kv_heads=2, head_dim=16, vocab_size=320)
    pool = SlotPool(base, num_slots=3, num_pages=12, max_rank=MAX_RANK, device=torch.device("cpu"),
                    dtype=torch.float32)
    pool.writes_every_layer = every_layer
    everything = [(layer, target) for layer in range(4) for target in base.module_shapes]
    dirty, kept = pool.take_pages(8), pool.take_pages(2)
    pool.write(0, dirty, random_adapter(base, 8, everything, seed=1))
    pool.clear(0)
    pool.return_pages(dirty[:3] + dirty[5:])  # pages 1-3 and 6-8 free again; 4, 5 stay taken
    pages = pool.take_pages(6)
    assert pages == [1, 2, 3, 6, 7, 8] and kept == [9, 10]
    adapter = random_adapter(base, 6, [(0, "q_proj"), (2, "q_proj"), (3, "q_proj"), (2, "up_proj")], seed=2)
    pool.write(1, pages, adapter)
    for layer in range(4):
        qkv, gate_up = pool.layer_weights[layer]["qkv_proj"], pool.layer_weights[layer]["gate_up_proj"]
        assert qkv.ranks[1] == (6 if (layer, "q_proj") in adapter.weights else 0)
        assert gate_up.ranks[1] == (6 if (layer, "up_proj") in adapter.weights else 0)
        if not every_layer and qkv.ranks[1] == 0:
            continue
        expected_a = torch.zeros(6, 3, 64)
        expected_b = torch.zeros(6, 128)
        if (layer, "q_proj") in adapter.weights:
            lora_a, lora_b = adapter.weights[(layer, "q_proj")]
            expected_a[:, 0] = lora_a
            expected_b[:, :64] = lora_b.T * adapter.scale
        torch.testing.assert_close(qkv.lora_a[pages], expected_a)
        torch.testing.assert_close(qkv.lora_b[pages], expected_b)
        if not every_layer and gate_up.ranks[1] == 0:
            continue
        expected_up = torch.zeros(6, 256)
        if (layer, "up_proj") in adapter.weights:
            expected_up[:, 128:] = adapter.weights[(layer, "up_proj")][1].T * adapter.scale
        torch.testing.assert_close(gate_up.lora_b[pages], expected_up)
        assert pool.layer_weights[layer]["down_proj"].ranks[1] == 0
        if every_layer:
            assert not pool.layer_weights[layer]["down_proj"].lora_a[pages].any()
        assert qkv.ranks[1] == (6 if layer != 1 else 0) and gate_up.ranks[1] == (6 if layer == 2 else 0)
    assert pool.slot_pages[1, :6].tolist() == pages


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_cpu_copy_kernel_writes_the_bits_of_the_torch_path(pool_dtype: torch.dtype, weight_dtype: torch.dtype,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The same adapters written by the C++ copy and by the torch operations it replaces (which run until it is
    built): every element of both pools equal, over dirty pages in two runs, layers with gaps, fused projections
    with some slices adapted, scales that round, and modules of their own rank and scale (PEFT's patterns)."""
    base = BaseModelShape.for_llama(num_layers=4, hidden_size=64, intermediate_size=96, num_heads=4,
                                    num_kv_heads=2, head_dim=16, vocab_size=320)
    everything = [(layer, target) for layer in range(4) for target in base.module_shapes]
    partial = [(0, "q_proj"), (0, "v_proj"), (2, "q_proj"), (3, "v_proj"), (2, "up_proj"), (1, "down_proj"),
               (3, "o_proj")]
    pools = []
    for use_kernel in (True, False):
        if not use_kernel:
            monkeypatch.setattr(cpu_adapter_copy.KERNEL, "module", None)
        pool = SlotPool(base, num_slots=3, num_pages=16, max_rank=MAX_RANK, device=torch.device("cpu"),
                        dtype=pool_dtype)
        for projection in pool._pools.values():
            projection.lora_a.zero_(), projection.lora_b.zero_()
        dirty = pool.take_pages(8)
        pool.write(0, dirty, cast(random_adapter(base, 8, everything, seed=1), weight_dtype, alpha=37.0))
        pool.clear(0)
        pool.return_pages(dirty[:3] + dirty[5:])
        pool.write(1, pool.take_pages(6), cast(random_adapter(base, 6, partial, seed=2), weight_dtype, alpha=7.0))
        pool.write(2, pool.take_pages(2), cast(random_adapter(base, 2, everything, seed=3), weight_dtype, alpha=3.0))
        pool.write(0, pool.take_pages(4), patterned(cast(random_adapter(base, 4, partial, seed=4), weight_dtype, 5.0)))
        pools.append(pool)
    for name, projection in pools[0]._pools.items():
        assert torch.equal(projection.lora_a, pools[1]._pools[name].lora_a), name
        assert torch.equal(projection.lora_b, pools[1]._pools[name].lora_b), name
        assert torch.equal(projection.ranks, pools[1]._pools[name].ranks), name
        assert projection.lora_b[:, 1:].abs().amax() > 0.1  # pages were written


def cast(adapter: LoraAdapter, dtype: torch.dtype, alpha: float) -> LoraAdapter:
    weights = {module: (lora_a.to(dtype), lora_b.to(dtype)) for module, (lora_a, lora_b) in adapter.weights.items()}
    return dataclasses.replace(adapter, alpha=alpha, weights=weights)


def patterned(adapter: LoraAdapter) -> LoraAdapter:
    """q in layer 0 at half the adapter's rank and a scale of its own, and up in layer 2 at another scale, as
    rank_pattern and alpha_pattern make them."""
    weights = dict(adapter.weights)
    lora_a, lora_b = weights[(0, "q_proj")]
    weights[(0, "q_proj")] = (lora_a[:adapter.rank // 2].contiguous(), lora_b[:, :adapter.rank // 2].contiguous())
    return dataclasses.replace(adapter, weights=weights, module_scales={(0, "q_proj"): 0.3, (2, "up_proj"): 1.7})
