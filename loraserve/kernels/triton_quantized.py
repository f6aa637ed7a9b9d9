"""The GPU's weight-only kernel: y = x W^T with W held as four-bit codes (a float16 scale and minimum per group of
32 inputs: GGUF's Q4_1, Q4_0 as minimum = -8 scale) or eight-bit ones (a float16 scale per 32: Q8_0), dequantized
tile by tile in registers and multiplied on the tensor cores, so a GPU serves a quantized base (LoRA adapters on
top, in the activation dtype) with a quarter or half of its weight memory. The reference is the dequantized
weight times x in float64 (the tests, through Triton's interpreter on a CPU).

Layout (`pack`): four-bit codes [out, in / 2] bytes, byte j of a group holding code j (low nibble) and code j + 16
(high), as GGUF stores them; eight-bit codes [out, in] int8; scales (and minimums) [out, in / 32] float16.
"""
import torch
import triton
import triton.language as tl

GROUP_SIZE = 32


@triton.jit
def _quantized_matmul_kernel(
    x, codes, scales, minimums, output, rows, out_features, groups,
    stride_x_row, stride_codes_row, stride_scales_row, stride_output_row,
    BITS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_OUT: tl.constexpr,
):
    """A [BLOCK_ROWS, BLOCK_OUT] tile of the output, one group of 32 inputs at a time: the group's codes are
    scaled (and shifted) into a float tile of W, which meets x's 32 columns in two dots of 16."""
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    column = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    row_valid, column_valid = row < rows, column < out_features
    half = tl.arange(0, 16)
    total = tl.zeros([BLOCK_ROWS, BLOCK_OUT], dtype=tl.float32)
    for group in range(0, groups):
        first = group * 32
        x_low = tl.load(x + row[:, None] * stride_x_row + first + half[None, :], mask=row_valid[:, None], other=0.0)
        x_high = tl.load(x + row[:, None] * stride_x_row + first + 16 + half[None, :], mask=row_valid[:, None],
                         other=0.0)
        scale = tl.load(scales + column * stride_scales_row + group, mask=column_valid, other=0.0).to(tl.float32)
        if BITS == 4:
            packed = tl.load(codes + column[None, :] * stride_codes_row + group * 16 + half[:, None],
                             mask=column_valid[None, :], other=0).to(tl.int32)  # [16, BLOCK_OUT]: W^T's bytes
            minimum = tl.load(minimums + column * stride_scales_row + group, mask=column_valid, other=0.0)
            minimum = minimum.to(tl.float32)[None, :]
            w_low = (packed & 15).to(tl.float32) * scale[None, :] + minimum
            w_high = (packed >> 4).to(tl.float32) * scale[None, :] + minimum
        else:
            base = codes + column[None, :] * stride_codes_row + first + half[:, None]
            w_low = tl.load(base, mask=column_valid[None, :], other=0).to(tl.float32) * scale[None, :]
            w_high = tl.load(base + 16, mask=column_valid[None, :], other=0).to(tl.float32) * scale[None, :]
        total += tl.dot(x_low.to(tl.float32), w_low, input_precision="ieee")
        total += tl.dot(x_high.to(tl.float32), w_high, input_precision="ieee")
    tl.store(output + row[:, None] * stride_output_row + column[None, :], total.to(output.dtype.element_ty),
             mask=row_valid[:, None] & column_valid[None, :])


def pack(codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor | None,
         bits: int) -> tuple[torch.Tensor, ...]:
    """codes [out, in] (uint8 0..15 or int8), scales and minimums [out, in / 32] -> this kernel's layout."""
    if bits == 4:
        rows, columns = codes.shape
        halves = codes.to(torch.uint8).reshape(rows, columns // GROUP_SIZE, 2, GROUP_SIZE // 2)
        codes = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(rows, columns // 2)
    parts = (codes.contiguous(), scales.to(torch.float16).contiguous())
    return parts + ((minimums.to(torch.float16).contiguous(),) if minimums is not None else ())


def quantized_linear(x: torch.Tensor, parts: tuple[torch.Tensor, ...], out_features: int, bits: int) -> torch.Tensor:
    """x [rows, in] times the weight `pack` made -> [rows, out] in x's dtype."""
    codes, scales = parts[0], parts[1]
    minimums = parts[2] if bits == 4 else scales  # unused for eight bits
    rows, groups = x.shape[0], scales.shape[1]
    output = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    block_rows = 16 if rows <= 16 else 64
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(out_features, 64))
    _quantized_matmul_kernel[grid](
        x, codes, scales, minimums, output, rows, out_features, groups,
        x.stride(0), codes.stride(0), scales.stride(0), output.stride(0),
        BITS=bits, BLOCK_ROWS=block_rows, BLOCK_OUT=64,
    )
    return output
