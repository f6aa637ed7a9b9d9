"""Compile every kernel for an H100 (sm_90) target without a GPU: catches type and shape errors that Triton's
CPU interpreter lets through. Run as a script (the interpreter must be off), as `test_compile.py` does."""
import os

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from loraserve.kernels.triton_decode_attention import _merge_kernel, _partition_kernel
from loraserve.kernels.triton_kv_write import _write_kv_kernel
from loraserve.kernels.triton_lora import _expand_kernel, _shrink_kernel
from loraserve.kernels.triton_paged_attention import _paged_attention_kernel
from loraserve.kernels.triton_quantized import _quantized_matmul_kernel


def compile_kernel(kernel: triton.JITFunction, pointers: dict[str, str], constants: dict[str, int]) -> None:
    """Integer scalars default to i32; `pointers` names every pointer (and float) argument's type."""
    signature = {name: pointers.get(name, "i32") for name in kernel.arg_names if name not in constants}
    signature.update({name: "constexpr" for name in constants})
    constexprs = {(kernel.arg_names.index(name),): value for name, value in constants.items()}
    triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "the interpreter must be off"
    data = "*bf16"
    compile_kernel(_write_kv_kernel, dict.fromkeys(["key", "value", "key_cache", "value_cache"], data)
                   | {"slot_mapping": "*i64"}, dict(NUM_KV_HEADS=3, HEAD_DIM=64, HEADS_PADDED=4, DIM_PADDED=64))
    attention_pointers = dict.fromkeys(["query", "key_cache", "value_cache", "output"], data) | dict.fromkeys(
        ["block_tables", "query_start_loc", "seq_lens"], "*i32") | {"scale_log2": "fp32"}
    # (GQA group, padded group, query tokens per program, head_dim, keys per step) as the wrapper picks them.
    for group, group_padded, block_query, head_dim, block_key in ((1, 1, 64, 128, 32), (3, 4, 4, 64, 64),
                                                                  (8, 8, 2, 128, 32)):
        compile_kernel(_paged_attention_kernel, attention_pointers, dict(
            GROUP=group, GROUP_PADDED=group_padded, HEAD_DIM=head_dim, DIM_PADDED=head_dim,
            BLOCK_QUERY=block_query, BLOCK_KEY=block_key))
    for cache_type, group, rows, head_dim in ((data, 3, 16, 64), (data, 8, 16, 128), ("*fp32", 1, 16, 64)):
        decode_pointers = dict.fromkeys(["query", "key_cache", "value_cache"], cache_type) | dict.fromkeys(
            ["partial_output", "partial_max", "partial_sum"], "*fp32") | dict.fromkeys(
            ["block_tables", "seq_lens"], "*i32") | {"scale_log2": "fp32"}
        compile_kernel(_partition_kernel, decode_pointers, dict(
            GROUP=group, ROWS=rows, HEAD_DIM=head_dim, DIM_PADDED=head_dim, PARTITION=512,
            BLOCK_KEY=64 if head_dim <= 64 else 32))
    compile_kernel(_merge_kernel, {"output": data} | dict.fromkeys(["partial_output", "partial_max", "partial_sum"],
                                                                    "*fp32"),
                   dict(HEAD_DIM=64, DIM_PADDED=64, PARTITIONS_PADDED=16))
    groups = {"sorted_rows": "*i64", "group_starts": "*i32", "group_slots": "*i32", "shrunk": "*fp32",
              "slot_pages": "*i64"}
    compile_kernel(_shrink_kernel, groups | {"x": data, "lora_a": data},
                   dict(BLOCK_ROWS=64, RANK_PADDED=64, BLOCK_IN=64))
    compile_kernel(_expand_kernel, groups | {"output": data, "lora_b": data, "slice_ends": "*i32"},
                   dict(NUM_SLICES=3, BLOCK_ROWS=16, BLOCK_OUT=64, RANK_PADDED=16))
    for bits, code_type in ((4, "*u8"), (8, "*i8")):
        compile_kernel(_quantized_matmul_kernel, {"x": data, "output": data, "codes": code_type, "scales": "*fp16",
                                                  "minimums": "*fp16"},
                       dict(BITS=bits, BLOCK_ROWS=16, BLOCK_OUT=64))
    print("compiled")


if __name__ == "__main__":
    main()
