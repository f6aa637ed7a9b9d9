"""The LoRA kernels (Triton's grouped shrink/expand, the grouped C++ kernel for the CPU, the per-slot reference)
against a float64 per-token computation, with slots of different ranks in pages scattered over the pool."""
import pytest
import torch

from loraserve.kernels.lora import LoraMapping, LoraWeights, PaddedLoraMapping, add_lora_cpu, add_lora_reference
from loraserve.kernels.triton_lora import add_lora_triton
from tests.kernels.helpers import relative_error



KERNELS = {"triton": add_lora_triton, "cpu": add_lora_cpu, "reference": add_lora_reference}


def padded_mapping(token_slots: list[int], device: str) -> PaddedLoraMapping:
    """As a CUDA graph sees it: room for more tokens and groups than there are, refilled in place."""
    mapping = PaddedLoraMapping.allocate(len(token_slots) + 5, torch.device(device))
    mapping.fill([0] * len(token_slots))  # an earlier step's mapping, overwritten below
    mapping.fill(token_slots)
    return mapping


def random_weights(num_slots: int, in_features: int, slice_sizes: list[int], rank: int, dtype: torch.dtype,
                   device: str, generator: torch.Generator) -> LoraWeights:
    """Slot i has rank max(1, rank - i), in pages scattered over the pool (its page-table row points at the zero
    page past its rank); the pages nobody uses, and the other layers' rows, hold NaN, so a kernel that reads one
    fails."""
    num_slices, out_features = len(slice_sizes), sum(slice_sizes)
    ranks = [max(1, rank - slot) for slot in range(num_slots)]
    num_pages = 2 * sum(ranks) + 1
    lora_a = torch.full((num_pages, num_slices, in_features), float("nan"))
    lora_b = torch.full((num_pages, out_features), float("nan"))
    lora_a[0], lora_b[0] = 0, 0
    slot_pages = torch.zeros(num_slots, rank, dtype=torch.int64)
    order = torch.randperm(num_pages - 1, generator=generator) + 1
    for slot, slot_rank in enumerate(ranks):
        pages, order = order[:slot_rank], order[slot_rank:]
        slot_pages[slot, :slot_rank] = pages
        lora_a[pages] = torch.randn(slot_rank, num_slices, in_features, generator=generator) / in_features**0.5
        lora_b[pages] = torch.randn(slot_rank, out_features, generator=generator)
    # As the slot pool holds them: one layer's view of page-major tensors, so a page's rows lie a stride apart.
    layers_a = torch.full((num_pages, 3, num_slices, in_features), float("nan"), dtype=dtype, device=device)
    layers_b = torch.full((num_pages, 3, out_features), float("nan"), dtype=dtype, device=device)
    layers_a[:, 1], layers_b[:, 1] = lora_a.to(layers_a), lora_b.to(layers_b)
    return LoraWeights(layers_a[:, 1], layers_b[:, 1], slot_pages.to(device), slice_sizes, ranks)


def check_lora(token_slots: list[int], in_features: int, slice_sizes: list[int], rank: int, num_slots: int,
               dtype: torch.dtype, device: str, tolerance: float, padded: bool = False, kernel: str = "triton",
               weight_dtype: torch.dtype | None = None) -> None:
    generator = torch.Generator().manual_seed(len(token_slots) + rank)
    weights = random_weights(num_slots, in_features, slice_sizes, rank, weight_dtype or dtype, device, generator)
    x = torch.randn(len(token_slots), in_features, generator=generator).to(dtype=dtype, device=device)
    base = torch.randn(len(token_slots), sum(slice_sizes), generator=generator).to(dtype=dtype, device=device)
    output = base.clone()
    mapping = (padded_mapping(token_slots, device) if padded
               else LoraMapping.from_token_slots(token_slots, torch.device(device)))
    KERNELS[kernel](output, x, weights, mapping)

    expected = base.cpu().double()
    for token, slot in enumerate(token_slots):
        if slot < 0:
            continue
        pages = weights.slot_pages[slot, :weights.ranks[slot]].cpu()
        lora_a, lora_b = weights.lora_a.cpu().double()[pages], weights.lora_b.cpu().double()[pages]
        for index, (start, end) in enumerate(weights.slice_bounds):
            shrunk = lora_a[:, index] @ x[token].cpu().double()  # [rank]
            expected[token, start:end] += shrunk @ lora_b[:, start:end]
    assert relative_error(output.cpu(), expected) < tolerance
    # Tokens without an adapter are left exactly as they were.
    no_adapter = torch.tensor([slot < 0 for slot in token_slots])
    assert torch.equal(output.cpu()[no_adapter], base.cpu()[no_adapter])


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("slice_sizes, rank", [
    ([48, 16, 16], 8),  # fused q/k/v, rank padded inside the kernel
    ([70], 4),  # one slice, out_features not a multiple of the tile
])
def test_mixed_adapters(slice_sizes: list[int], rank: int, kernel: str) -> None:
    token_slots = [2, -1, 0, 2, 2, 1, -1, 0] + [2] * 13 + [-1, 1]
    check_lora(token_slots, 100, slice_sizes, rank, 3, torch.float32, "cpu", 1e-5, kernel=kernel)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_single_group_over_one_row_tile(kernel: str) -> None:
    check_lora([1] * 19 + [-1], 24, [16, 16], 16, 2, torch.float32, "cpu", 1e-5, kernel=kernel)


def test_the_cpu_kernel_in_bfloat16_accumulates_in_float32() -> None:
    token_slots = [3, 0, -1, 1, 3, 2] * 5
    check_lora(token_slots, 64, [32, 16, 16], 8, 4, torch.bfloat16, "cpu", 1e-2, kernel="cpu")


@pytest.mark.parametrize("kernel", ["cpu", "reference"])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16])
def test_16_bit_weights_under_float32_inputs(weight_dtype: torch.dtype, kernel: str) -> None:
    """A quantized base's adapters are held in 16 bits: the product of the weights as stored, summed in float32."""
    token_slots = [3, 0, -1, 1, 3, 2] * 5 + [1] * 40
    check_lora(token_slots, 100, [48, 16, 16], 9, 4, torch.float32, "cpu", 1e-5, kernel=kernel,
               weight_dtype=weight_dtype)


def test_the_cpu_kernel_over_many_groups_and_a_long_group() -> None:
    """Ranks not a multiple of the kernel's unroll, more output columns than one block, a group as long as a
    prefill chunk beside one-token groups."""
    token_slots = [5] * 300 + list(range(6)) * 3 + [-1] * 4
    check_lora(token_slots, 72, [130, 60, 60], 7, 6, torch.float32, "cpu", 1e-5, kernel="cpu")


@pytest.mark.parametrize("token_slots", [[3, -1, 0, 3, 0, -1, 3], [-1, -1, -1]], ids=["some slots", "no adapter"])
def test_padded_mapping_with_empty_groups(token_slots: list[int]) -> None:
    check_lora(token_slots, 40, [32, 16, 16], 8, 5, torch.float32, "cpu", 1e-5, padded=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestOnGpu:
    @pytest.mark.parametrize("slice_sizes, rank", [([576, 192, 192], 16), ([1536, 1536], 8), ([576], 64)])
    def test_mixed_adapters_bfloat16(self, slice_sizes: list[int], rank: int) -> None:
        generator = torch.Generator().manual_seed(rank)
        token_slots = torch.randint(-1, 4, (300,), generator=generator).tolist()
        check_lora(token_slots, 576, slice_sizes, rank, 4, torch.bfloat16, "cuda", 1e-2)
