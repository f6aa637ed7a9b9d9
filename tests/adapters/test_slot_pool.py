"""Slots written by the pool, run through kernels.lora, against y = s * x A^T B^T computed from PEFT's own files."""
import math
from collections.abc import Callable
from pathlib import Path

import torch

from adapters.format import load_adapter
from adapters.slot_pool import SlotPool
from kernels.lora import LoraMapping, add_lora
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


def test_written_slots_give_each_token_its_adapters_delta(saved_adapter: Callable[..., Path]) -> None:
    pool = SlotPool(BASE, num_slots=4, max_rank=MAX_RANK, device=torch.device("cpu"), dtype=torch.float32)
    directories = {slot: saved_adapter(**settings) for slot, (settings, _) in SLOTS.items()}
    pool.write(0, load_adapter(directories[3], BASE, MAX_RANK))  # overwritten next: must leave no trace
    for slot, directory in directories.items():
        pool.write(slot, load_adapter(directory, BASE, MAX_RANK))
    mapping = LoraMapping.from_token_slots(TOKEN_SLOTS, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    for layer in range(BASE.num_layers):
        for projection, targets in PROJECTIONS.items():
            in_features = BASE.module_shapes[targets[0]][0]
            x = torch.randn(len(TOKEN_SLOTS), in_features, generator=generator, dtype=torch.float64)
            output = torch.zeros(len(TOKEN_SLOTS), sum(BASE.module_shapes[target][1] for target in targets))
            add_lora(output, x.float(), pool.layer_weights[layer][projection], mapping)
            expected = torch.zeros(output.shape, dtype=torch.float64)
            for row, slot in enumerate(TOKEN_SLOTS):
                if slot in SLOTS:
                    expected[row] = reference_delta(read_tensors(directories[slot]), SLOTS[slot][1], layer,
                                                    projection, x[row:row + 1])[0]
            torch.testing.assert_close(output.double(), expected, atol=1e-5, rtol=1e-5)
            assert output.abs().max() > 0.1  # the comparison is not between zeros


def test_clear_zeroes_one_slot_only(saved_adapter: Callable[..., Path]) -> None:
    pool = SlotPool(BASE, num_slots=2, max_rank=MAX_RANK, device=torch.device("cpu"), dtype=torch.float32)
    adapter = load_adapter(saved_adapter(targets=tuple(BASE.module_shapes)), BASE, MAX_RANK)
    pool.write(0, adapter)
    pool.write(1, adapter)
    pool.clear(0)
    for projections in pool.layer_weights:
        for weights in projections.values():
            assert not weights.lora_a[0].any() and not weights.lora_b[0].any() and weights.scales[0] == 0
            assert weights.lora_a[1].any() and weights.lora_b[1].any() and weights.scales[1] == adapter.scale


def test_pool_shapes_follow_the_base_model() -> None:
    pool = SlotPool(BASE, num_slots=3, max_rank=MAX_RANK, device=torch.device("cpu"), dtype=torch.bfloat16)
    qkv = pool.layer_weights[1]["qkv_proj"]
    assert len(pool.layer_weights) == BASE.num_layers
    assert qkv.lora_a.shape == (3, 3 * MAX_RANK, 64) and qkv.lora_b.shape == (3, 64 + 32 + 32, MAX_RANK)
    assert qkv.slice_sizes == [64, 32, 32] and qkv.lora_a.dtype == torch.bfloat16
    assert pool.layer_weights[0]["down_proj"].lora_a.shape == (3, MAX_RANK, 128)
