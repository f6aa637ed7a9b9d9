"""A LoRA adapter's weights (DoRA's magnitudes included): names, dtypes and shapes checked against its config
and the base model from the safetensors header, before a tensor is read."""
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraserve.adapters.adapter_info import AdapterInfo, BaseModelShape, LoadedAdapter
from loraserve.adapters.config_checks import CONFIG_FILE
from loraserve.adapters.errors import AdapterFormatError
from loraserve.adapters.lora_config import TARGETS, Module, read_lora_settings
from loraserve.adapters.safetensors_reader import check_dtype, read_finite_tensors, tensor_headers

# PEFT over LlamaForCausalLM saves base_model.model.model.layers...; over LlamaModel, base_model.model.layers...
TENSOR_NAME = re.compile(
    r"base_model\.model\.(?:model\.)?layers\.(\d+)\.(\w+)\.(\w+)\.lora_(?:([AB])\.weight|magnitude_vector)")
MAGNITUDE = "M"  # a module's DoRA magnitude vector, beside its matrices "A" and "B"

TensorNames = dict[Module, dict[str, str]]  # each module's tensor names: "A", "B" and, with DoRA, MAGNITUDE


@dataclass(frozen=True)
class LoraAdapter(LoadedAdapter):
    """A validated adapter with its weights on the CPU, in their stored dtype; a (layer, target) not in weights is
    untouched. A module's rank is its A's rows."""

    weights: dict[Module, tuple[torch.Tensor, torch.Tensor]]  # (A [rank, in], B [out, rank])
    module_scales: dict[Module, float] = dataclasses.field(default_factory=dict)  # where patterns set them
    # DoRA: each module's magnitude vector [out] as stored, until `dora.resolve` turns it into the factor each
    # output feature is multiplied by, less one (`column_scales`), which needs the base weights.
    magnitudes: dict[Module, torch.Tensor] = dataclasses.field(default_factory=dict)
    column_scales: dict[Module, torch.Tensor] = dataclasses.field(default_factory=dict)

    def scale_of(self, module: Module) -> float:
        return self.module_scales.get(module, self.scale)


@dataclass(frozen=True)
class LoraLayout:
    """What the config and header tell of a LoRA adapter: its description, tensor names and module scales."""

    info: AdapterInfo
    tensor_names: TensorNames
    module_scales: dict[Module, float]


def inspect_lora(config: dict[str, Any], weights_path: Path, base: BaseModelShape, max_rank: int) -> LoraLayout:
    settings = read_lora_settings(config, base.num_layers, max_rank)
    tensor_names = _check_header(weights_path, settings.module_ranks, base, settings.use_dora)
    targets = [target for target in TARGETS if any(target == module[1] for module in settings.modules)]
    size_bytes = sum(rank * sum(base.module_shapes[target]) * 4
                     for (_, target), rank in settings.module_ranks.items())
    info = AdapterInfo(settings.rank, settings.alpha, settings.use_rslora, targets, size_bytes,
                       use_dora=settings.use_dora)
    return LoraLayout(info, tensor_names, settings.module_scales)


def load_lora(layout: LoraLayout, weights_path: Path) -> LoraAdapter:
    weights, magnitudes = read_weights(weights_path, layout.tensor_names)
    return LoraAdapter(**dataclasses.asdict(layout.info), weights=weights, module_scales=layout.module_scales,
                       magnitudes=magnitudes)


def read_weights(path: Path, tensor_names: TensorNames
                 ) -> tuple[dict[Module, tuple[torch.Tensor, torch.Tensor]], dict[Module, torch.Tensor]]:
    """The matrices and the DoRA magnitude vectors (if any) as stored (their dtype kept: the slot pool converts
    them as it copies)."""
    tensors = read_finite_tensors(path, [name for names in tensor_names.values() for name in names.values()])
    weights = {module: (tensors[names["A"]], tensors[names["B"]]) for module, names in tensor_names.items()}
    magnitudes = {module: tensors[names[MAGNITUDE]] for module, names in tensor_names.items() if MAGNITUDE in names}
    return weights, magnitudes


def _check_header(path: Path, module_ranks: dict[Module, int], base: BaseModelShape, use_dora: bool
                  ) -> TensorNames:
    """Tensor names by module, after checking every name, dtype and shape (each module's at its own rank), and
    that each module has A and B, and a magnitude vector exactly when the config asks for DoRA."""
    modules = module_ranks.keys()
    found: dict[Module, dict[str, str]] = {}
    for name, (dtype, shape) in tensor_headers(path).items():
        module, matrix = _parse_tensor_name(name, base)
        if module not in modules:
            raise AdapterFormatError(f"tensor {name!r} adapts layer {module[0]} {module[1]}, which "
                                     f"target_modules/layers_to_transform in {CONFIG_FILE} do not target")
        if matrix == MAGNITUDE and not use_dora:
            raise AdapterFormatError(f"tensor {name!r} is a DoRA magnitude vector, but {CONFIG_FILE} does not set "
                                     f"use_dora")
        if matrix in found.setdefault(module, {}):
            raise AdapterFormatError(f"tensors {found[module][matrix]!r} and {name!r} are the same matrix")
        found[module][matrix] = name
        _check_tensor(name, dtype, shape, module, matrix, base, module_ranks[module])
    for layer, target in sorted(modules):
        for matrix in ("A", "B", MAGNITUDE) if use_dora else ("A", "B"):
            if matrix not in found.get((layer, target), {}):
                suffix = "magnitude_vector" if matrix == MAGNITUDE else f"{matrix}.weight"
                raise AdapterFormatError(f"missing tensor base_model.model.model.layers.{layer}.{TARGETS[target]}."
                                         f"{target}.lora_{suffix}")
    return found


def _parse_tensor_name(name: str, base: BaseModelShape) -> tuple[Module, str]:
    match = TENSOR_NAME.fullmatch(name)
    if match is None:
        raise AdapterFormatError(f"unexpected tensor {name!r}; expected base_model.model.model.layers.<layer>."
                                 f"<self_attn|mlp>.<projection>.lora_<A|B>.weight or .lora_magnitude_vector")
    layer, parent, target, matrix = int(match[1]), match[2], match[3], match[4] or MAGNITUDE
    if TARGETS.get(target) != parent:
        raise AdapterFormatError(f"tensor {name!r} adapts {parent}.{target}; adapters may target only "
                                 f"{', '.join(TARGETS)}")
    if layer >= base.num_layers:
        raise AdapterFormatError(f"tensor {name!r} is for layer {layer}, but the base model has "
                                 f"{base.num_layers} layers")
    return (layer, target), matrix


def _check_tensor(name: str, dtype: str, shape: list[int], module: Module, matrix: str, base: BaseModelShape,
                  rank: int) -> None:
    check_dtype(name, dtype)
    in_features, out_features = base.module_shapes[module[1]]
    expected = {"A": [rank, in_features], "B": [out_features, rank], MAGNITUDE: [out_features]}[matrix]
    if shape != expected:
        raise AdapterFormatError(f"tensor {name!r} has shape {shape}, expected {expected} (rank {rank}; the "
                                 f"base model's {module[1]} maps {in_features} to {out_features} features)")
