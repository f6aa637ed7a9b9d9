"""Weight-only quantization: GGUF blocks decoded exactly, quantized layers against their float64 reference, and a
quantized model against the float model it stands for."""
from types import SimpleNamespace

import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from loraserve.model.layers.quantized_linear import QuantizedLinear
from loraserve.model.gguf_loader import stored_weight_bits
from loraserve.model.loader import load_model
from loraserve.kernels import cpu_quantized
from loraserve.kernels.cpu_quantized import pack, unpack
from loraserve.model.quantization import GROUP_SIZE, QuantizedTensor, decode_gguf_q4, decode_gguf_q8, quantize
from tests.model.helpers import paged_greedy, paged_prefill, save_tiny_llama
from tests.model.test_gguf import needs_embedded

# Our kernel quantizes activations to int16 per group (about 3e-5 of an output's scale), PyTorch's int4 kernel,
# the fallback until ours is built, takes bfloat16 ones (8 bits of mantissa): both within 1% of the float64
# product of the same weights, and bfloat16 outputs round to about that too.
TOLERANCE = 2e-2


def random_weight(rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, columns, generator=generator) * torch.rand(rows, 1, generator=generator)


def decode_gguf(blocks, rows: int, kind: GGMLQuantizationType) -> QuantizedTensor:
    if kind == GGMLQuantizationType.Q8_0:
        return decode_gguf_q8(blocks, rows)
    return decode_gguf_q4(blocks, rows, with_minimum=kind == GGMLQuantizationType.Q4_1)


@pytest.mark.parametrize("kind", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0])
def test_gguf_blocks_decode_exactly_into_the_kernels_layout(kind):
    """Codes and scales as the file stores them: the weight they stand for is gguf's own dequantization, bit for
    bit, and so is what the kernel's tiled layout holds (40 rows: two tiles and a padded one)."""
    weight = random_weight(40, 128).numpy()
    blocks = gguf_quantize(weight, kind)
    decoded = decode_gguf(blocks, 40, kind)
    assert decoded.group_size == GROUP_SIZE and decoded.fits_kernel
    assert decoded.bits == (8 if kind == GGMLQuantizationType.Q8_0 else 4)
    expected = torch.from_numpy(gguf_dequantize(blocks, kind).reshape(40, 128))
    assert torch.equal(decoded.dequantize(), expected)
    codes, *scales = unpack(*pack(decoded.codes, decoded.scales, decoded.minimums, decoded.bits), decoded.bits, 40)
    minimums = scales[1] if decoded.bits == 4 else None
    assert torch.equal(QuantizedTensor(codes, scales[0], minimums, decoded.bits).dequantize(), expected)


def test_gguf_q8_0_survives_quantizing_its_own_dequantization():
    """The tied embedding is Q8_0 and the quantized head is made from its float copy: the same codes and scales
    come back."""
    blocks = gguf_quantize(random_weight(32, 128).numpy(), GGMLQuantizationType.Q8_0)
    decoded = decode_gguf_q8(blocks, 32)
    again = quantize(decoded.dequantize(), 8)
    assert torch.equal(again.codes, decoded.codes) and torch.equal(again.scales, decoded.scales)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_on_load_errs_by_at_most_half_a_step(bits):
    weight = random_weight(64, 96)
    quantized = quantize(weight, bits)
    step = quantized.scales.repeat_interleave(quantized.group_size, dim=1)
    # float16 scales and minimums: the step's and the minimum's rounding (2**-11 relative) on top of half a step
    slack = 2**-10 * weight.abs().amax(1, keepdim=True)
    assert ((quantized.dequantize() - weight).abs() <= step / 2 + slack).all()


def test_row_selection_keeps_codes_and_scales_together():
    quantized = quantize(random_weight(8, 64), 4)
    order = torch.tensor([3, 1, 7, 0, 2, 6, 5, 4])
    assert torch.equal(quantized[order].dequantize(), quantized.dequantize()[order])


def quantized_layer(quantized: QuantizedTensor) -> QuantizedLinear:
    rows, columns = quantized.shape
    layer = QuantizedLinear(columns, rows, quantized.bits)
    for name, value in quantized.parts().items():
        getattr(layer, name).copy_(value)
    layer.pack()
    return layer


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_tokens", [1, 5, 64])
def test_quantized_linear_matches_float64(bits, dtype, num_tokens):
    quantized = quantize(random_weight(96, 128, seed=bits), bits)
    layer = quantized_layer(quantized)
    x = torch.randn(num_tokens, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = x.double() @ quantized.dequantize().double().T
    output = layer(x)
    assert output.dtype == dtype and output.shape == (num_tokens, 96)
    error = (output.double() - expected).abs().max() / expected.abs().max()
    assert error < TOLERANCE, error


@pytest.mark.parametrize("bits", [4, 8])
def test_before_the_kernel_is_built_a_layer_falls_back_to_pytorch(monkeypatch: pytest.MonkeyPatch, bits: int):
    """Four bits through PyTorch's int4 kernel (bfloat16 activations), eight through the dequantized weight."""
    quantized = quantize(random_weight(48, 128, seed=bits), bits)
    layer = quantized_layer(quantized)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(2))
    ours = layer(x)
    monkeypatch.setattr(cpu_quantized.KERNEL, "module", None)
    fallback = layer(x)
    expected = x.double() @ quantized.dequantize().double().T
    assert fallback.dtype == torch.float32 and not torch.equal(ours, fallback)  # two kernels really ran
    assert (fallback.double() - expected).abs().max() < TOLERANCE * expected.abs().max()


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_quantized_model_matches_its_dequantized_float_model(tmp_path, quantization):
    """A safetensors model quantized on load against the same model in float32 with its weights replaced by what
    the codes stand for: the last position's logits within bfloat16's reach, the same top token."""
    directory = save_tiny_llama(tmp_path / "model")
    quantized = load_model(str(directory), torch.device("cpu"), torch.bfloat16, quantization)
    reference = load_model(str(directory), torch.device("cpu"), torch.float32)
    bits = {"int4": 4, "int8": 8}[quantization]
    with torch.no_grad():
        for name, module in reference.model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("layers."):
                module.weight.copy_(quantize(module.weight, bits).dequantize())
    assert isinstance(quantized.model.layers[0].self_attn.qkv_proj, QuantizedLinear)
    prompt = list(range(3, 40))
    with torch.no_grad():
        ours = paged_prefill(quantized.model, prompt)[-1].float()
        expected = paged_prefill(reference.model, prompt)[-1].float()
    assert (ours - expected).abs().max() < 0.05 * expected.abs().max()
    assert ours.argmax() == expected.argmax()


def test_a_quantized_model_reads_its_head_as_int8(tmp_path):
    """Logits through the head's int8 codes (a scale per 32 inputs), for a decode's few rows and a prompt's many."""
    model = load_model(str(save_tiny_llama(tmp_path / "model")), torch.device("cpu"), torch.float32, "int4").model
    hidden = torch.randn(40, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    expected = hidden.double() @ quantize(model.head_weight.detach(), 8).dequantize().double().T
    for rows in (1, 40):
        logits = model.compute_logits(hidden[:rows])
        assert ((logits.double() - expected[:rows]).norm() / expected[:rows].norm()) < 1e-4


def test_quantization_is_refused_on_devices_without_a_kernel(tmp_path):
    directory = save_tiny_llama(tmp_path / "model")
    with pytest.raises(Exception, match="CPU or CUDA"):
        load_model(str(directory), torch.device("meta"), torch.bfloat16, "int4")


def test_auto_keeps_a_float_checkpoint_float(tmp_path):
    loaded = load_model(str(save_tiny_llama(tmp_path / "model")), torch.device("cpu"), torch.float32, "auto")
    assert isinstance(loaded.model.layers[0].mlp.down_proj, torch.nn.Linear)



@pytest.mark.slow
@needs_embedded
def test_embedded_model_served_as_its_four_bit_codes_answers_paris():
    """The default: the file's Q4_1 layers run as int4 (token by token, so through the kernel), the rest float32."""
    loaded = load_model("embedded", torch.device("cpu"), None, "auto")
    assert isinstance(loaded.model.layers[0].mlp.gate_up_proj, QuantizedLinear)
    assert next(loaded.model.parameters()).dtype == torch.float32
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = loaded.tokenizer.encode(loaded.tokenizer.apply_chat_template(messages), add_special_tokens=False)
    answer = paged_greedy(loaded.model, prompt, max_new_tokens=12, block_size=16)
    assert "Paris" in loaded.tokenizer.decode(answer)


@pytest.mark.parametrize("types, bits", [
    ([GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_0], 4),
    ([GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q8_0], 8),
    ([GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0], None),
    ([GGMLQuantizationType.F16, GGMLQuantizationType.F16], None),
])
def test_a_gguf_files_layer_types_decide_what_auto_serves(types, bits):
    """Layers all four-bit: int4; all Q8_0: int8; anything else: float. The embedding's type does not count."""
    tensors = [SimpleNamespace(name=f"blk.{index}.attn_q.weight", shape=(64, 64), tensor_type=kind)
               for index, kind in enumerate(types)]
    tensors.append(SimpleNamespace(name="token_embd.weight", shape=(64, 100), tensor_type=GGMLQuantizationType.Q8_0))
    assert stored_weight_bits(tensors) == bits
