"""DoRA (weight-decomposed LoRA, `use_dora`): a module's output is y = g * (W x + s B A x), where the magnitude
vector m the adapter carries is divided by the norm of each output feature's row of the adapted weight,
g = m / ||W + s B A||. PEFT computes the norm in every forward; it depends only on the weights, so it is computed
once here, when the adapter is read, against the base weights the engine hands the registry (what a quantized
base's codes stand for, as PEFT's forward dequantizes them). The pool keeps g - 1, which rounds well in 16 bits,
and the layers add (g - 1) * y to y after the LoRA delta (`kernels/lora.py`, `scale_columns`).

The norm is expanded, ||W_r||^2 + 2 s B_r . (A W_r^T) + s^2 ||B_r A||^2, so that no [out, in] matrix is made per
adapter: the base rows' squared norms are computed once per projection and kept by the engine, A W^T is the base
projection applied to A's rows, and the last term needs only A A^T (a rank-16 adapter on the embedded model's
seven projections: 400 ms with the weights dequantized and summed per adapter, a few tens with the expansion)."""
import dataclasses
from typing import Protocol

import torch

from loraserve.adapters.errors import AdapterFormatError
from loraserve.adapters.adapter_info import BaseModelShape
from loraserve.adapters.format import Adapter
from loraserve.adapters.lora_format import LoraAdapter
from loraserve.adapters.slot_pool import FUSED_PROJECTIONS


class BaseWeights(Protocol):
    """The base model's fused projections (qkv_proj, o_proj, gate_up_proj, down_proj) as DoRA needs them."""

    def row_norms(self, layer: int, projection: str) -> torch.Tensor:
        """Each output row's squared norm, float64 [out]."""
        ...

    def project(self, layer: int, projection: str, inputs: torch.Tensor) -> torch.Tensor:
        """The projection applied to rows [n, in] (float32, on the CPU), [n, out] on the CPU."""
        ...


def resolve(adapter: Adapter, base: BaseModelShape, weights: BaseWeights | None) -> Adapter:
    """The adapter with each DoRA module's column scales (g - 1) computed and its magnitudes dropped; a plain
    LoRA adapter unchanged."""
    if not isinstance(adapter, LoraAdapter) or not adapter.magnitudes:
        return adapter
    if weights is None:
        raise AdapterFormatError("a DoRA adapter needs the base model's weights, which this registry was not given")
    scales = {}
    for (layer, target), magnitude in adapter.magnitudes.items():
        projection = next(name for name, targets in FUSED_PROJECTIONS.items() if target in targets)
        targets = FUSED_PROJECTIONS[projection]
        start = sum(base.module_shapes[name][1] for name in targets[:targets.index(target)])
        rows = slice(start, start + base.module_shapes[target][1])
        lora_a, lora_b = (tensor.double() for tensor in adapter.weights[(layer, target)])
        scale = adapter.scale_of((layer, target))
        cross = (weights.project(layer, projection, lora_a.float())[:, rows].double().T * lora_b).sum(dim=1)
        lora_part = ((lora_b @ (lora_a @ lora_a.T)) * lora_b).sum(dim=1)
        squared = weights.row_norms(layer, projection)[rows] + 2 * scale * cross + scale * scale * lora_part
        column_scale = magnitude.double() / squared.clamp(min=0).sqrt() - 1
        if not bool(torch.isfinite(column_scale).all()):
            raise AdapterFormatError(f"DoRA on layer {layer} {target}: an output feature's adapted weight has norm "
                                     f"zero, so its magnitude cannot be applied")
        scales[(layer, target)] = column_scale.float()
    return dataclasses.replace(adapter, magnitudes={}, column_scales=scales)
