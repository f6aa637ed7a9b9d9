"""What the in-process benchmarks on the embedded model share: their device and output flags, and the model."""
import argparse
import sys
from pathlib import Path

from loraserve.engine.async_engine import resolve_device, resolve_dtype
from loraserve.model.loader import LoadedModel, load_model


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
