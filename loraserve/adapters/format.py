"""Reads and validates a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) for a Llama base.

Everything the config (peft_config.py) and the safetensors header can tell is checked before a tensor is read,
so a bad upload fails fast and with a message that names the problem. Pickled weights (adapter_model.bin) are
refused unread: unpickling runs arbitrary code.
"""
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from loraserve.adapters.errors import AdapterFormatError, AdapterNotFoundError
from loraserve.adapters.peft_config import CONFIG_FILE, TARGETS, LoraSettings, Module, read_lora_settings
from loraserve.kernels import cpu_adapter_copy

WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS_FILE = "adapter_model.bin"
SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
ACCEPTED_DTYPES = set(SAFETENSORS_DTYPES)
# PEFT over LlamaForCausalLM saves base_model.model.model.layers...; over LlamaModel, base_model.model.layers...
TENSOR_NAME = re.compile(
    r"base_model\.model\.(?:model\.)?layers\.(\d+)\.(\w+)\.(\w+)\.lora_(?:([AB])\.weight|magnitude_vector)")
MAGNITUDE = "M"  # a module's DoRA magnitude vector, beside its matrices "A" and "B"

TensorNames = dict[Module, dict[str, str]]  # each module's tensor names: "A", "B" and, with DoRA, MAGNITUDE


@dataclass(frozen=True)
class BaseModelShape:
    """What an adapter must fit: the layer count and each target's (in_features, out_features)."""

    num_layers: int
    module_shapes: dict[str, tuple[int, int]]

    def __post_init__(self) -> None:
        assert set(self.module_shapes) == set(TARGETS), f"need shapes for exactly {list(TARGETS)}"

    @classmethod
    def for_llama(cls, num_layers: int, hidden_size: int, intermediate_size: int, num_heads: int,
                  num_kv_heads: int, head_dim: int) -> "BaseModelShape":
        return cls(num_layers, {
            "q_proj": (hidden_size, num_heads * head_dim), "k_proj": (hidden_size, num_kv_heads * head_dim),
            "v_proj": (hidden_size, num_kv_heads * head_dim), "o_proj": (num_heads * head_dim, hidden_size),
            "gate_proj": (hidden_size, intermediate_size), "up_proj": (hidden_size, intermediate_size),
            "down_proj": (intermediate_size, hidden_size),
        })


@dataclass(frozen=True)
class AdapterInfo:
    """A validated adapter without its weights: what the registry lists for adapters still on disk."""

    rank: int  # the largest module's (the pages it takes)
    alpha: float
    use_rslora: bool
    targets: list[str]  # in TARGETS order
    size_bytes: int  # of the float32 weights once loaded
    use_dora: bool = dataclasses.field(default=False, kw_only=True)

    @property
    def num_pages(self) -> int:
        """Pool pages it takes: one per rank component, and with DoRA one more for its column scales."""
        return self.rank + self.use_dora

    @property
    def scale(self) -> float:
        """The scale of a module no rank or alpha pattern names."""
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank


@dataclass(frozen=True)
class LoraAdapter(AdapterInfo):
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

    def info(self) -> AdapterInfo:
        """The description alone, to keep after the weights are dropped."""
        return AdapterInfo(self.rank, self.alpha, self.use_rslora, self.targets, self.size_bytes,
                           use_dora=self.use_dora)


def inspect_adapter(directory: Path, base: BaseModelShape, max_rank: int) -> AdapterInfo:
    """Validate config and safetensors header without reading tensor data (cheap enough for a start-up scan)."""
    return _validate(directory, base, max_rank)[0]


def load_adapter(directory: Path, base: BaseModelShape, max_rank: int) -> LoraAdapter:
    info, tensor_names, settings = _validate(directory, base, max_rank)
    weights, magnitudes = _read_weights(directory / WEIGHTS_FILE, tensor_names)
    return LoraAdapter(**dataclasses.asdict(info), weights=weights, module_scales=settings.module_scales,
                       magnitudes=magnitudes)


def adapter_files(directory: Path) -> list[Path]:
    """The two files an adapter consists of; refuses a missing one, and pickled weights without reading them."""
    if not directory.is_dir():
        raise AdapterNotFoundError(f"no adapter directory at {directory}")
    config, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config.is_file():
        raise AdapterFormatError(f"missing {CONFIG_FILE}")
    if not weights.is_file():
        if (directory / PICKLED_WEIGHTS_FILE).exists():
            raise AdapterFormatError(f"{PICKLED_WEIGHTS_FILE} holds pickled weights, which are refused (unpickling "
                                     f"runs arbitrary code); save the adapter as {WEIGHTS_FILE}")
        raise AdapterFormatError(f"missing {WEIGHTS_FILE}")
    return [config, weights]


def _validate(directory: Path, base: BaseModelShape, max_rank: int
              ) -> tuple[AdapterInfo, TensorNames, LoraSettings]:
    config_path, weights_path = adapter_files(directory)
    settings = read_lora_settings(config_path, base.num_layers, max_rank)
    tensor_names = _check_header(weights_path, settings.module_ranks, base, settings.use_dora)
    targets = [target for target in TARGETS if any(target == module[1] for module in settings.modules)]
    size_bytes = sum(rank * sum(base.module_shapes[target]) * 4
                     for (_, target), rank in settings.module_ranks.items())
    info = AdapterInfo(settings.rank, settings.alpha, settings.use_rslora, targets, size_bytes,
                       use_dora=settings.use_dora)
    return info, tensor_names, settings


def _check_header(path: Path, module_ranks: dict[Module, int], base: BaseModelShape, use_dora: bool
                  ) -> TensorNames:
    """Tensor names by module, after checking every name, dtype and shape (each module's at its own rank), and
    that each module has A and B, and a magnitude vector exactly when the config asks for DoRA."""
    modules = module_ranks.keys()
    found: dict[Module, dict[str, str]] = {}
    try:
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                module, matrix = _parse_tensor_name(name, base)
                if module not in modules:
                    raise AdapterFormatError(f"tensor {name!r} adapts layer {module[0]} {module[1]}, which "
                                             f"target_modules/layers_to_transform in {CONFIG_FILE} do not target")
                if matrix == MAGNITUDE and not use_dora:
                    raise AdapterFormatError(f"tensor {name!r} is a DoRA magnitude vector, but {CONFIG_FILE} does "
                                             f"not set use_dora")
                if matrix in found.setdefault(module, {}):
                    raise AdapterFormatError(f"tensors {found[module][matrix]!r} and {name!r} are the same matrix")
                found[module][matrix] = name
                tensor = handle.get_slice(name)
                _check_tensor(name, tensor.get_dtype(), tensor.get_shape(), module, matrix, base,
                              module_ranks[module])
    except (SafetensorError, OSError) as error:
        raise AdapterFormatError(f"{path.name} is not a readable safetensors file: {error}") from error
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
    if dtype not in ACCEPTED_DTYPES:
        raise AdapterFormatError(f"tensor {name!r} has dtype {dtype}; accepted: {', '.join(sorted(ACCEPTED_DTYPES))}")
    in_features, out_features = base.module_shapes[module[1]]
    expected = {"A": [rank, in_features], "B": [out_features, rank], MAGNITUDE: [out_features]}[matrix]
    if list(shape) != expected:
        raise AdapterFormatError(f"tensor {name!r} has shape {list(shape)}, expected {expected} (rank {rank}; the "
                                 f"base model's {module[1]} maps {in_features} to {out_features} features)")


def _read_weights(path: Path, tensor_names: TensorNames
                  ) -> tuple[dict[Module, tuple[torch.Tensor, torch.Tensor]], dict[Module, torch.Tensor]]:
    """The matrices and the DoRA magnitude vectors (if any) as stored (their dtype kept: the slot pool converts
    them as it copies), after one check for NaN and infinities over all of them."""
    try:
        tensors = _read_tensors(path, [name for names in tensor_names.values() for name in names.values()])
    except (ValueError, KeyError, OSError) as error:
        raise AdapterFormatError(f"{path.name} is not a readable safetensors file: {error}") from error
    names = list(tensors)
    if (bad := cpu_adapter_copy.first_non_finite(list(tensors.values()))) is not None:
        raise AdapterFormatError(f"tensor {names[bad]!r} holds NaN or infinite values")
    weights = {module: (tensors[names["A"]], tensors[names["B"]]) for module, names in tensor_names.items()}
    magnitudes = {module: tensors[names[MAGNITUDE]] for module, names in tensor_names.items() if MAGNITUDE in names}
    return weights, magnitudes


def _read_tensors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Each named tensor read into its own memory with pread. Not through safetensors' memory map: a file cut
    short while it is read (an adapter directory rewritten in place) would end the whole server with SIGBUS,
    where a short read fails this adapter alone."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        header_length = int.from_bytes(_read_exactly(descriptor, 8, 0), "little")
        if header_length > os.fstat(descriptor).st_size - 8:
            raise ValueError("the file ends inside its header")
        header = json.loads(_read_exactly(descriptor, header_length, 8))
        tensors = {}
        for name in names:
            entry = header[name]
            tensor = torch.empty(entry["shape"], dtype=SAFETENSORS_DTYPES[entry["dtype"]])
            begin, end = entry["data_offsets"]
            if end - begin != tensor.numel() * tensor.element_size():
                raise ValueError(f"tensor {name!r} has {end - begin} bytes for shape {entry['shape']}")
            target = tensor.view(torch.uint8).numpy().reshape(-1)
            if os.preadv(descriptor, [target], 8 + header_length + begin) != target.size:
                raise ValueError(f"the file ends inside tensor {name!r}")
            tensors[name] = tensor
        return tensors
    finally:
        os.close(descriptor)


def _read_exactly(descriptor: int, length: int, offset: int) -> bytes:
    data = os.pread(descriptor, length, offset)
    if len(data) != length:
        raise ValueError("the file ends inside its header")
    return data
