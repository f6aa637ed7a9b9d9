"""The one entry point that turns a model source into a ready model, its config and its tokenizer."""
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from loraserve.model.config import ModelConfig
from loraserve.model.embedded import EMBEDDED_NAME, embedded_gguf_path
from loraserve.model.errors import ModelLoadError
from loraserve.model.gguf_loader import read_gguf
from loraserve.model.hf_loader import read_hf_directory
from loraserve.model.llama import LlamaModel
from loraserve.model.tokenizer import Tokenizer
from loraserve.model.weights import Checkpoint, load_weights


@dataclass
class LoadedModel:
    """A model in eval mode on its device, with what the engine needs to feed it and read it."""

    model: LlamaModel
    config: ModelConfig
    tokenizer: Tokenizer
    name: str


def load_model(source: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """source: "embedded", a Hugging Face directory, or a .gguf file."""
    if source == "embedded":
        path, name = embedded_gguf_path(), EMBEDDED_NAME
    else:
        path = Path(source)
        name = path.name if path.is_dir() else path.stem
    checkpoint = read_checkpoint(path)
    with default_device_and_dtype(device, dtype):
        model = LlamaModel(checkpoint.config)
    load_weights(model, checkpoint.tensors, checkpoint.num_tensors)
    return LoadedModel(model.eval(), checkpoint.config, checkpoint.tokenizer, name)


def read_checkpoint(path: Path) -> Checkpoint:
    if path.is_dir():
        return read_hf_directory(path)
    if path.suffix == ".gguf" and path.is_file():
        return read_gguf(path)
    raise ModelLoadError(f"model source {str(path)!r} is not 'embedded', a Hugging Face directory, or a .gguf file")


@contextmanager
def default_device_and_dtype(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Build parameters where and as they will live, so no full-size float32 copy is made first."""
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous_dtype)
