"""What a LoRA adapter's adapter_config.json asks for, checked against what we serve: LoRA on the seven projections
of a Llama decoder layer, with per-module ranks and alphas (`rank_pattern`, `alpha_pattern`) resolved as PEFT resolves
them, and DoRA (`use_dora`). Options that would change the math otherwise are refused by name, never silently
ignored."""
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loraserve.adapters.config_checks import is_int, is_positive_number, refuse_options
from loraserve.adapters.errors import AdapterFormatError, AdapterTooLargeError

# The projections an adapter may target, each with the decoder-layer module that holds it.
TARGETS: dict[str, str] = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
# Config options that change the forward pass beyond y += s * x A^T B^T; any truthy value is refused.
UNSUPPORTED_OPTIONS: dict[str, str] = {
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "lora_bias": "a bias on lora_B (lora_bias)", "fan_in_fan_out": "transposed weights (fan_in_fan_out)",
    "exclude_modules": "exclude_modules", "layer_replication": "layer replication",
    "trainable_token_indices": "trainable token embeddings", "target_parameters": "parameter targets",
    "use_qalora": "QA-LoRA", "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
}

Module = tuple[int, str]  # (layer, target)


@dataclass(frozen=True)
class LoraSettings:
    rank: int  # the largest of the modules' ranks (`r` unless a pattern raises one)
    alpha: float
    use_rslora: bool
    modules: frozenset[Module]  # every (layer, target) the adapter must carry weights for
    module_ranks: dict[Module, int]  # each module's rank: `r`, or the rank_pattern entry matching its name
    module_scales: dict[Module, float]  # each module's alpha / r (or alpha / sqrt(r) with rsLoRA), patterns applied
    use_dora: bool  # each module also carries a magnitude vector (DoRA)


def read_lora_settings(config: dict[str, Any], num_layers: int, max_rank: int) -> LoraSettings:
    rank, alpha, use_rslora = _check_config(config)
    modules = _targeted_modules(config, num_layers)
    rank_pattern = _pattern(config, "rank_pattern", lambda value: is_int(value) and value >= 1, "positive integers")
    alpha_pattern = _pattern(config, "alpha_pattern", is_positive_number, "positive numbers")
    ranks = {module: rank_pattern.get(_pattern_key(rank_pattern, module_name(*module)), rank) for module in modules}
    alphas = {module: float(alpha_pattern.get(_pattern_key(alpha_pattern, module_name(*module)), alpha))
              for module in modules}
    largest = max(ranks.values())
    if largest > max_rank:
        raise AdapterTooLargeError(f"rank {largest} exceeds the server's max LoRA rank {max_rank}")
    scales = {module: alphas[module] / (math.sqrt(ranks[module]) if use_rslora else ranks[module])
              for module in modules}
    use_dora = config.get("use_dora", False)
    if not isinstance(use_dora, bool):
        raise AdapterFormatError(f"use_dora must be true or false, got {use_dora!r}")
    return LoraSettings(largest, alpha, use_rslora, modules, ranks, scales, use_dora)


def module_name(layer: int, target: str) -> str:
    """The module's name in a Llama causal LM, as PEFT matches patterns against it."""
    return f"model.layers.{layer}.{TARGETS[target]}.{target}"


def _pattern(config: dict[str, Any], key: str, valid: Callable[[Any], bool], kind: str) -> dict[str, Any]:
    """A rank or alpha pattern: module-name regexes (as PEFT reads them) to values."""
    pattern = config.get(key) or {}
    if not isinstance(pattern, dict) or not all(isinstance(name, str) and valid(value)
                                                for name, value in pattern.items()):
        raise AdapterFormatError(f"{key} must map module names to {kind}, got {pattern!r}")
    for name in pattern:
        try:
            re.compile(name)
        except re.error as error:
            raise AdapterFormatError(f"{key} key {name!r} is not a valid regex: {error}") from error
    return pattern


def _pattern_key(pattern: dict[str, Any], name: str) -> str:
    """PEFT's rule (`get_pattern_key`): the first key matching the end of the name at a dot, else the name."""
    return next((key for key in pattern if re.match(rf"(.*\.)?({key})$", name)), name)


def _check_config(config: dict[str, Any]) -> tuple[int, float, bool]:
    """(rank, alpha, use_rslora) of a plain LoRA config; refuses everything that would change the math."""
    refuse_options(config, UNSUPPORTED_OPTIONS)
    if config.get("bias", "none") != "none":
        raise AdapterFormatError(f"bias={config['bias']!r} is not supported; only bias='none'")
    rank, alpha, use_rslora = config.get("r"), config.get("lora_alpha"), config.get("use_rslora", False)
    if not is_int(rank) or rank < 1:
        raise AdapterFormatError(f"r must be a positive integer, got {rank!r}")
    if not is_positive_number(alpha):
        raise AdapterFormatError(f"lora_alpha must be a positive number, got {alpha!r}")
    if not isinstance(use_rslora, bool):
        raise AdapterFormatError(f"use_rslora must be true or false, got {use_rslora!r}")
    return rank, float(alpha), use_rslora


def _targeted_modules(config: dict[str, Any], num_layers: int) -> frozenset[Module]:
    """The (layer, target) pairs PEFT would have adapted, matching module names the way PEFT does: a string is
    a regex over the whole name ("all-linear" meaning every projection), a list entry matches a name's suffix."""
    layers = _layers_to_transform(config.get("layers_to_transform"), num_layers)
    names = {(layer, target): module_name(layer, target) for layer in layers for target in TARGETS}
    spec = config.get("target_modules")
    if spec == "all-linear":
        return frozenset(names)
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as error:
            raise AdapterFormatError(f"target_modules {spec!r} is not a valid regex: {error}") from error
        modules = frozenset(module for module, name in names.items() if pattern.fullmatch(name))
        if not modules:
            raise AdapterFormatError(f"target_modules {spec!r} matches none of {', '.join(TARGETS)}")
        return modules
    if not isinstance(spec, list) or not spec or not all(isinstance(entry, str) for entry in spec):
        raise AdapterFormatError(f"target_modules must be a non-empty list of names or a regex, got {spec!r}")
    modules: set[Module] = set()
    for entry in spec:
        matched = {module for module, name in names.items() if name == entry or name.endswith("." + entry)}
        if not matched:
            raise AdapterFormatError(f"target module {entry!r} is not supported; adapters may target only "
                                     f"{', '.join(TARGETS)}")
        modules |= matched
    return frozenset(modules)


def _layers_to_transform(value: Any, num_layers: int) -> list[int]:
    if value is None:
        return list(range(num_layers))
    layers = [value] if is_int(value) else value
    if not isinstance(layers, list) or not layers or not all(is_int(layer) and 0 <= layer < num_layers
                                                              for layer in layers):
        raise AdapterFormatError(f"layers_to_transform {value!r} must name layers below {num_layers}")
    return layers
