"""The prompt-learning kinds: prompt tuning (learned embeddings of virtual tokens put before the prompt) and prefix
tuning (learned keys and values of virtual tokens in every layer). PEFT saves either as one tensor,
`prompt_embeddings`, the prompt encoder's output: the embeddings [virtual tokens, hidden], or each virtual token's
keys and values in every layer [virtual tokens, layers * 2 * key/value width] (with `prefix_projection` the MLP's
output, so it is applied once, by PEFT, and not again here). How they enter a step: a request's sequence starts
with the virtual tokens; prompt tuning's are computed from their embeddings like prompt tokens, prefix tuning's KV
is written into the request's cache blocks as they are (`engine/model_runner.py`). Both reach the prefix cache
keyed by the adapter version, so repeated requests share them."""
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraserve.adapters.adapter_info import PREFIX_TUNING, PROMPT_TUNING, AdapterInfo, BaseModelShape, LoadedAdapter
from loraserve.adapters.config_checks import CONFIG_FILE, is_int, refuse_options
from loraserve.adapters.errors import AdapterFormatError
from loraserve.adapters.safetensors_reader import check_dtype, read_finite_tensors, tensor_headers

TENSOR = "prompt_embeddings"
KINDS = {"PROMPT_TUNING": PROMPT_TUNING, "PREFIX_TUNING": PREFIX_TUNING}
# Initialisations of the embeddings before training: what was trained is what the file holds, whichever it was.
PROMPT_TUNING_INITS = {"TEXT", "RANDOM", "SAMPLE_VOCAB"}
UNSUPPORTED_OPTIONS = {"modules_to_save": "fully trained extra modules (modules_to_save)"}


@dataclass(frozen=True)
class VirtualTokens:
    """What a prompt-learning adapter puts before each of its requests' prompts, in float32: the embeddings
    (prompt tuning) or each layer's keys and values (prefix tuning) of its virtual tokens."""

    embeddings: torch.Tensor | None = None  # [virtual tokens, hidden]
    key_values: torch.Tensor | None = None  # [layers, 2, virtual tokens, key/value width]

    def to(self, device: torch.device) -> "VirtualTokens":
        return VirtualTokens(*(None if tensor is None else tensor.to(device) for tensor in
                               (self.embeddings, self.key_values)))


@dataclass(frozen=True)
class PromptLearningAdapter(LoadedAdapter):
    virtual_tokens: VirtualTokens


def inspect_prompt_learning(config: dict[str, Any], weights_path: Path, base: BaseModelShape) -> AdapterInfo:
    """The description of a prompt- or prefix-tuning adapter, after checking its config and its one tensor's
    dtype and shape against the base model."""
    kind = KINDS[config["peft_type"]]
    refuse_options(config, UNSUPPORTED_OPTIONS)
    if config.get("task_type") != "CAUSAL_LM":
        raise AdapterFormatError(f"task_type is {config.get('task_type')!r}; a {config['peft_type']} adapter is "
                                 f"served for 'CAUSAL_LM'")
    count = config.get("num_virtual_tokens")
    if not is_int(count) or count < 1:
        raise AdapterFormatError(f"num_virtual_tokens must be a positive integer, got {count!r}")
    if config.get("num_transformer_submodules") not in (None, 1):
        raise AdapterFormatError(f"num_transformer_submodules is {config['num_transformer_submodules']!r}; a "
                                 f"decoder has 1")
    _check_kind_options(config, kind, base)
    width = base.hidden_size if kind == PROMPT_TUNING else base.num_layers * 2 * base.kv_width
    headers = tensor_headers(weights_path)
    if list(headers) != [TENSOR]:
        raise AdapterFormatError(f"a {config['peft_type']} adapter holds one tensor, {TENSOR!r}; found "
                                 f"{sorted(headers)}")
    dtype, shape = headers[TENSOR]
    check_dtype(TENSOR, dtype)
    if shape != [count, width]:
        what = "the hidden size" if kind == PROMPT_TUNING else "layers x 2 x key/value heads x head size"
        raise AdapterFormatError(f"tensor {TENSOR!r} has shape {shape}, expected {[count, width]} "
                                 f"(num_virtual_tokens, {what} of the base model)")
    return AdapterInfo(0, 0.0, False, [], count * width * 4, kind=kind, num_virtual_tokens=count)


def load_prompt_learning(info: AdapterInfo, weights_path: Path, base: BaseModelShape) -> PromptLearningAdapter:
    stored = read_finite_tensors(weights_path, [TENSOR])[TENSOR].float()
    if info.kind == PROMPT_TUNING:
        virtual_tokens = VirtualTokens(embeddings=stored)
    else:  # PEFT reads each token's row as [layers * 2, heads, head size]: keys of layer l at 2l, values at 2l + 1
        per_layer = stored.view(info.num_virtual_tokens, base.num_layers, 2, base.kv_width)
        virtual_tokens = VirtualTokens(key_values=per_layer.permute(1, 2, 0, 3).contiguous())
    return PromptLearningAdapter(**dataclasses.asdict(info), virtual_tokens=virtual_tokens)


def _check_kind_options(config: dict[str, Any], kind: str, base: BaseModelShape) -> None:
    """The options of one kind that must agree with the base model (PEFT fills them in from its config)."""
    if kind == PROMPT_TUNING:
        init = config.get("prompt_tuning_init", "RANDOM")
        if init not in PROMPT_TUNING_INITS:
            raise AdapterFormatError(f"prompt_tuning_init {init!r} is not one of {sorted(PROMPT_TUNING_INITS)}")
        expected = {"token_dim": base.hidden_size}
    else:
        if not isinstance(config.get("prefix_projection", False), bool):
            raise AdapterFormatError(f"prefix_projection must be true or false, got {config['prefix_projection']!r}")
        expected = {"token_dim": base.kv_width, "num_layers": base.num_layers}
    for key, value in expected.items():
        if config.get(key, value) != value:
            raise AdapterFormatError(f"{CONFIG_FILE} has {key}={config[key]!r}, but the base model's is {value}")
