"""What the in-process benchmarks on the embedded model share: their device and output flags, and the model."""
import argparse
import sys
from pathlib import Path

from torch import nn

from loraserve.engine.async_engine import resolve_device, resolve_dtype
from loraserve.model.layers.quantized_linear import QuantizedLinear
from loraserve.model.llama import LlamaModel
from loraserve.model.loader import LoadedModel, load_model
from loraserve.model.quantization import GROUP_SIZE


def add_device_and_out(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="float32 separates a kernel's error from bfloat16 rounding")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))


def load_embedded(args: argparse.Namespace) -> LoadedModel:
    """The embedded model on --device at --dtype (the server's default unless asked); creates --out."""
    args.out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    print("loading the embedded model...", file=sys.stderr)
    return load_model("embedded", device, resolve_dtype(args.dtype), "auto")


def weight_bytes_per_step(model: LlamaModel) -> int:
    """The weight bytes one decode step reads, as the model is served: each quantized projection's codes and float16
    group scales (and minimums for four bits), the float parameters, and the embedding only where it is the float
    head (a lookup reads a few rows)."""
    total = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            scale_bytes = 4 if module.bits == 4 else 2  # a float16 scale per group, and a minimum for four bits
            weights = module.out_features * module.in_features
            total += weights * module.bits // 8 + weights // GROUP_SIZE * scale_bytes
    embedding_read = model.lm_head is None and model.quantized_head is None
    return total + sum(_bytes(parameter) for name, parameter in model.named_parameters()
                       if embedding_read or not name.startswith("embed_tokens."))


def _bytes(parameter: nn.Parameter) -> int:
    return parameter.numel() * parameter.element_size()
