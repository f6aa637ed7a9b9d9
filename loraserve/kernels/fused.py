"""A decoder layer's element-wise steps: RMSNorm, SiLU times up, and rotary embedding with the KV-cache write. On
the CPU each runs as one C++ call (`cpu_fused.cpp`, built in the background like the other kernels); on CUDA, or
until the build is done, as the torch forms here, which are also what the C++ ones are tested against."""
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from loraserve.kernels.attention import write_kv_cache
from loraserve.kernels.cpp_extension import BackgroundExtension

KERNEL = BackgroundExtension("cpu_fused", Path(__file__).with_name("cpu_fused.cpp"))


def cpu_kernel(tensor: torch.Tensor) -> ModuleType | None:
    return None if tensor.is_cuda else KERNEL.get()


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    kernel = cpu_kernel(hidden)
    if kernel is not None and hidden.dim() == 2 and hidden.is_contiguous():
        return kernel.rms_norm(hidden, weight, eps)
    return rms_norm_reference(hidden, weight, eps)


def rms_norm_reference(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """In float32, then rounded to the input's dtype before the weight, as the reference Llama."""
    input_dtype = hidden.dtype
    hidden = hidden.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(input_dtype)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for rows holding the gate, then the up projection."""
    kernel = cpu_kernel(gate_up)
    if kernel is not None and gate_up.is_contiguous():
        return kernel.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotate_and_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: tuple[torch.Tensor, ...],
                     slot_mapping: torch.Tensor, num_heads: int) -> torch.Tensor:
    """qkv [tokens, (heads + 2 kv_heads) * head_dim] -> rotated queries [tokens, heads, head_dim]; the rotated keys
    and the values are stored at their cache slots. cos, sin: [tokens, 1, head_dim / 2] float32."""
    key_cache, value_cache = kv_cache
    num_kv_heads, head_dim = key_cache.shape[2:]
    kernel = cpu_kernel(qkv)
    if kernel is not None and qkv.is_contiguous():
        return kernel.rotate_and_cache(qkv, cos.flatten(1), sin.flatten(1), key_cache, value_cache, slot_mapping,
                                       num_heads)
    query, key, value = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    query = apply_rotary(query.view(-1, num_heads, head_dim), cos, sin)
    key = apply_rotary(key.view(-1, num_kv_heads, head_dim), cos, sin)
    write_kv_cache(key, value.view(-1, num_kv_heads, head_dim), key_cache, value_cache, slot_mapping)
    return query


def apply_rotary(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel i with channel i + head_dim/2 of states [num_tokens, heads, head_dim]."""
    cos, sin = cos.to(states.dtype), sin.to(states.dtype)
    first, second = states.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
