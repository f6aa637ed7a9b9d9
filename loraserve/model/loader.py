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
from loraserve.model.layers.quantized_linear import QuantizedLinear
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


QUANTIZATIONS = {"none": None, "int4": 4, "int8": 8}


def load_model(source: str, device: torch.device, dtype: torch.dtype | None,
               quantization: str = "none") -> LoadedModel:
    """source: "embedded", a Hugging Face directory, or a .gguf file. quantization: "none" (every weight in
    `dtype`), "int4" or "int8" (the layers' projections weight-only quantized, on load if the file is float), or
    "auto" (as the file stores them: a GGUF file's Q4_0/Q4_1 layers as int4 and Q8_0 ones as int8, anything else in
    `dtype`). dtype None chooses (`choose_precision`)."""
    if source == "embedded":
        path, name = embedded_gguf_path(), EMBEDDED_NAME
    else:
        path = Path(source)
        name = path.name if path.is_dir() else path.stem
    checkpoint = read_checkpoint(path)
    dtype, bits = choose_precision(dtype, quantization, checkpoint.weight_bits, device)
    if bits is not None and device.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"weight-only quantization runs on a CPU or CUDA device, not {device.type}; serve "
                             "with --quantization none")
    with default_device_and_dtype(device, dtype):
        model = LlamaModel(checkpoint.config, bits)
    load_weights(model, checkpoint.tensors, checkpoint.num_tensors)
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.pack()
    if bits is not None:
        model.quantize_head()
    return LoadedModel(model.eval(), checkpoint.config, checkpoint.tokenizer, name)


def choose_precision(dtype: torch.dtype | None, quantization: str, stored_bits: int | None,
                     device: torch.device) -> tuple[torch.dtype, int | None]:
    """The activation dtype and weight bits to serve with. "auto" quantization keeps a file's quantized layers
    as they are on the CPU unless float32 is asked for (the exact reference path); an unset dtype is bfloat16 on
    CUDA and float32 on the CPU (the quantized kernels take bfloat16 inputs whatever the model's dtype)."""
    if quantization == "auto":
        bits = None if dtype == torch.float32 or device.type != "cpu" else stored_bits
    else:
        bits = QUANTIZATIONS[quantization]
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return dtype, bits


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
