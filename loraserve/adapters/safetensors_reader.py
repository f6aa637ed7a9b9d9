"""An adapter's safetensors file: its header read to check names, dtypes and shapes before any data, then the
tensors read with pread, each into its own memory, checked for NaN and infinities once over all of them."""
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from loraserve.adapters.errors import AdapterFormatError
from loraserve.kernels import cpu_adapter_copy

SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def tensor_headers(path: Path) -> dict[str, tuple[str, list[int]]]:
    """Each tensor's (dtype, shape) by name, from the header alone."""
    try:
        with safe_open(path, framework="pt") as handle:
            return {name: (handle.get_slice(name).get_dtype(), list(handle.get_slice(name).get_shape()))
                    for name in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise AdapterFormatError(f"{path.name} is not a readable safetensors file: {error}") from error


def check_dtype(name: str, dtype: str) -> None:
    if dtype not in SAFETENSORS_DTYPES:
        raise AdapterFormatError(f"tensor {name!r} has dtype {dtype}; accepted: "
                                 f"{', '.join(sorted(SAFETENSORS_DTYPES))}")


def read_finite_tensors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors as stored (their dtype kept), after one check for NaN and infinities over all of them."""
    try:
        tensors = _read_tensors(path, names)
    except (ValueError, KeyError, OSError) as error:
        raise AdapterFormatError(f"{path.name} is not a readable safetensors file: {error}") from error
    if (bad := cpu_adapter_copy.first_non_finite(list(tensors.values()))) is not None:
        raise AdapterFormatError(f"tensor {names[bad]!r} holds NaN or infinite values")
    return tensors


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
