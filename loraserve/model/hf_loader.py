"""Read a Hugging Face model directory: config, safetensors weights, tokenizer and chat template."""
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import tokenizers
import torch
from safetensors import safe_open

from loraserve.model.config import ModelConfig, token_id_list
from loraserve.model.errors import ModelLoadError
from loraserve.model.tokenizer import Tokenizer
from loraserve.model.weights import Checkpoint


def read_hf_directory(directory: Path) -> Checkpoint:
    """Parse everything but the weights now; the weights stream later, one tensor at a time."""
    config = read_config(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors files in {directory}")
    names = {file: [name for name in tensor_names(file) if is_model_weight(name, config)] for file in files}
    num_tensors = sum(len(file_names) for file_names in names.values())
    return Checkpoint(config, read_tokenizer(directory, config.eos_token_ids), stream_tensors(names), num_tensors)


def read_config(directory: Path) -> ModelConfig:
    """config.json, with generation_config.json's eos ids when it has them (chat models often add some)."""
    config = ModelConfig.from_hf_config(read_json(directory / "config.json", required=True))
    generation_eos = token_id_list(read_json(directory / "generation_config.json").get("eos_token_id"))
    return replace(config, eos_token_ids=generation_eos) if generation_eos else config


def read_tokenizer(directory: Path, eos_token_ids: list[int]) -> Tokenizer:
    """tokenizer.json is the tokenizer; tokenizer_config.json names BOS/EOS for the template and may hold it.
    Stopping uses the model config's `eos_token_ids`."""
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.exists():
        raise ModelLoadError(f"{tokenizer_file} is missing (only fast tokenizers are supported)")
    backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    tokenizer_config = read_json(directory / "tokenizer_config.json")
    bos_token = token_content(tokenizer_config.get("bos_token"))
    eos_token = token_content(tokenizer_config.get("eos_token"))
    chat_template = read_chat_template(directory, tokenizer_config)
    return Tokenizer(backend, bos_token, eos_token, eos_token_ids, chat_template)


def read_chat_template(directory: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """A chat_template.jinja file wins over the tokenizer config's entry, which may be a list of named ones."""
    template_file = directory / "chat_template.jinja"
    if template_file.exists():
        return template_file.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {entry["name"]: entry["template"] for entry in template}
        return named.get("default")
    return template


def tensor_names(file: Path) -> list[str]:
    with safe_open(file, framework="pt") as handle:
        return list(handle.keys())


def is_model_weight(name: str, config: ModelConfig) -> bool:
    """Old checkpoints carry rope buffers; tied ones may still carry a copy of the head."""
    if name.endswith("rotary_emb.inv_freq"):
        return False
    return not (config.tie_word_embeddings and name == "lm_head.weight")


def stream_tensors(names: dict[Path, list[str]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name without "model.", tensor), opening each file once."""
    for file, file_names in names.items():
        with safe_open(file, framework="pt") as handle:
            for name in file_names:
                yield name.removeprefix("model."), handle.get_tensor(name)


def read_json(path: Path, required: bool = False) -> dict[str, Any]:
    if not path.exists():
        if required:
            raise ModelLoadError(f"{path} is missing")
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def token_content(token: str | dict[str, Any] | None) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict."""
    return token["content"] if isinstance(token, dict) else token
