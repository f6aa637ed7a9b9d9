"""DoRA (weight-decomposed LoRA, `use_dora`): a module's output is y = g * (W x + s B A x), where the magnitude
vector m the adapter carries is divided by the norm of each output feature's row of the adapted weight,
g = m / ||W + s B A||. PEFT computes the norm in every forward; it depends only on the weights, so it is computed
once here, when the adapter is read, from the base weights the engine hands the registry (dequantized when the base
is quantized, as PEFT's forward dequantizes them). The pool keeps g - 1, which rounds well in 16 bits, and the
layers add (g - 1) * y to y after the LoRA delta (`kernels/lora.py`, `scale_columns`)."""
import dataclasses
from collections.abc import Callable

import torch

from loraserve.adapters.errors import AdapterFormatError
from loraserve.adapters.format import BaseModelShape, LoraAdapter, Module
from loraserve.adapters.slot_pool import FUSED_PROJECTIONS

# A fused projection's float32 weight [out, in] in one layer (qkv_proj, o_proj, gate_up_proj or down_proj).
BaseWeight = Callable[[int, str], torch.Tensor]


def resolve(adapter: LoraAdapter, base: BaseModelShape, base_weight: BaseWeight | None) -> LoraAdapter:
    """The adapter with each DoRA module's column scales (g - 1) computed and its magnitudes dropped; a plain
    LoRA adapter unchanged."""
    if not adapter.magnitudes:
        return adapter
    if base_weight is None:
        raise AdapterFormatError("a DoRA adapter needs the base model's weights, which this registry was not given")
    scales: dict[Module, torch.Tensor] = {}
    fused: dict[tuple[int, str], torch.Tensor] = {}
    for (layer, target), magnitude in sorted(adapter.magnitudes.items()):
        weight = _target_rows(fused, base, base_weight, layer, target)
        lora_a, lora_b = adapter.weights[(layer, target)]
        adapted = weight + adapter.scale_of((layer, target)) * (lora_b.float() @ lora_a.float())
        scale = magnitude.float() / torch.linalg.norm(adapted, dim=1) - 1
        if not bool(torch.isfinite(scale).all()):
            raise AdapterFormatError(f"DoRA on layer {layer} {target}: an output feature's adapted weight has norm "
                                     f"zero, so its magnitude cannot be applied")
        scales[(layer, target)] = scale
    return dataclasses.replace(adapter, magnitudes={}, column_scales=scales)


def _target_rows(fused: dict[tuple[int, str], torch.Tensor], base: BaseModelShape, base_weight: BaseWeight,
                 layer: int, target: str) -> torch.Tensor:
    """The target's rows of its fused projection's weight, each fused weight fetched once."""
    projection = next(name for name, targets in FUSED_PROJECTIONS.items() if target in targets)
    if (layer, projection) not in fused:
        if any(held_layer != layer for held_layer, _ in fused):
            fused.clear()  # modules come sorted by layer: earlier layers are done with
        fused[(layer, projection)] = base_weight(layer, projection).float()
    targets = FUSED_PROJECTIONS[projection]
    start = sum(base.module_shapes[name][1] for name in targets[:targets.index(target)])
    return fused[(layer, projection)][start:start + base.module_shapes[target][1]]
