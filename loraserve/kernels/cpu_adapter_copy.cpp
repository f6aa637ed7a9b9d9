// Bringing an adapter into the CPU's page pool at memory speed: the check that its weights are finite, and the
// copy of its A rows and scaled B columns into its pages, each one pass over the weights in one call.
//
// In torch these were a few hundred operations per adapter (or stacked temporaries, a float32 copy for the scale
// and a dtype conversion PyTorch does not vectorize from float16 to bfloat16): about 1 GB/s, so loading the
// adapters of a batch of new requests took seconds. Both run on the adapter loader's one thread, with the GIL
// released.
#include <torch/extension.h>

#include <cstring>

namespace {

inline float bits_to_float(uint32_t bits) {
    float value;
    std::memcpy(&value, &bits, sizeof(value));
    return value;
}

inline uint32_t float_to_bits(float value) {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    return bits;
}

// A weight as float32. c10 converts float16 one element at a time (`_cvtsh_ss`), which no loop vectorizes (1 ns an
// element). This form is integer and float arithmetic the compiler vectorizes: the exponent and mantissa moved
// into float32's places and rescaled by 2^112 (the difference of the biases; float16's subnormals come out
// exact), infinities and NaN kept apart. Equal to the hardware's conversion for all 65,536 inputs.
template <typename weight_t>
inline float to_float(weight_t value) { return static_cast<float>(value); }

template <>
inline float to_float(c10::Half value) {
    const uint32_t sign = (value.x & 0x8000u) << 16, rest = (value.x & 0x7FFFu) << 13;
    const uint32_t finite = float_to_bits(bits_to_float(rest) * 0x1p112f);
    return bits_to_float(sign | ((value.x & 0x7C00u) == 0x7C00u ? rest | 0x7F800000u : finite));
}

// A float32 as the pool's dtype. c10's bfloat16 rounding tests for NaN first, which keeps the loop scalar; the
// weights were checked finite on load, so this rounds to nearest even (as c10 does) without the test.
template <typename pool_t>
inline pool_t from_float(float value) { return static_cast<pool_t>(value); }

template <>
inline c10::BFloat16 from_float(float value) {
    uint32_t bits = float_to_bits(value);
    bits += 0x7FFF + ((bits >> 16) & 1);
    return c10::BFloat16(static_cast<uint16_t>(bits >> 16), c10::BFloat16::from_bits());
}

// Whether any element has every exponent bit set (NaN or an infinity), read as bits so the loop vectorizes.
template <typename bits_t>
bool any_non_finite(const bits_t* bits, int64_t count, bits_t exponent) {
    bits_t found = 0;  // the lanes' matches or-ed together: a branch-free loop that vectorizes
#pragma omp simd reduction(| : found)
    for (int64_t index = 0; index < count; ++index) found |= (bits[index] & exponent) == exponent;
    return found != 0;
}

bool non_finite(const torch::Tensor& tensor) {
    TORCH_CHECK(tensor.is_contiguous(), "contiguous tensors");
    const int64_t count = tensor.numel();
    switch (tensor.scalar_type()) {
        case torch::kHalf:
            return any_non_finite(static_cast<const uint16_t*>(tensor.data_ptr()), count, uint16_t{0x7C00});
        case torch::kBFloat16:
            return any_non_finite(static_cast<const uint16_t*>(tensor.data_ptr()), count, uint16_t{0x7F80});
        case torch::kFloat:
            return any_non_finite(static_cast<const uint32_t*>(tensor.data_ptr()), count, uint32_t{0x7F800000});
        default:
            TORCH_CHECK(false, "float16, bfloat16 or float32 tensors, not ", tensor.scalar_type());
    }
}

// Where an adapter's rank components go in one fused projection's pool.
struct Destination {
    const std::vector<int64_t>& pages;  // rank component j is page pages[j]
    const std::vector<int64_t>& slice_starts;  // [slices + 1]: each slice's first output column
};

// pool_a[layer, page_j, slice, :] = A[j, :], zero past A's rows (a module of lower rank than the adapter's
// largest) and where A is empty (a slice the adapter leaves alone).
template <typename pool_t, typename weight_t>
void write_a(const Destination& destination, torch::Tensor& pool_a, int64_t layer, int64_t slice,
             const torch::Tensor& lora_a) {
    const int64_t in_features = pool_a.size(3), own_rank = lora_a.numel() ? lora_a.size(0) : 0;
    const weight_t* source = own_rank ? lora_a.data_ptr<weight_t>() : nullptr;
    for (int64_t component = 0; component < static_cast<int64_t>(destination.pages.size()); ++component) {
        pool_t* row = pool_a.data_ptr<pool_t>() + layer * pool_a.stride(0)
                      + destination.pages[component] * pool_a.stride(1) + slice * pool_a.stride(2);
        if (component >= own_rank) {
            std::fill(row, row + in_features, pool_t(0));
            continue;
        }
        const weight_t* from = source + component * in_features;
#pragma omp simd
        for (int64_t index = 0; index < in_features; ++index) row[index] = from_float<pool_t>(to_float(from[index]));
    }
}

// pool_b[layer, page_j, slice's columns] = scale * B[:, j] (rounded once, from float32), zero past B's columns and
// where B is empty.
// B is [out, rank]: each of its rows feeds one column of every page. It is transposed a tile at a time (kTileRows
// of its rows by kTileComponents of its columns, in cache) and each page's part of the tile written as one run;
// element by element, or a page at a time through B's strided columns, ran at 1 GB/s.
constexpr int64_t kTileRows = 64;
constexpr int64_t kTileComponents = 16;

template <typename pool_t, typename weight_t>
void write_b(const Destination& destination, torch::Tensor& pool_b, int64_t layer, int64_t slice,
             const torch::Tensor& lora_b, float scale) {
    const int64_t rank = destination.pages.size(), first = destination.slice_starts[slice];
    const int64_t columns = destination.slice_starts[slice + 1] - first;
    std::vector<pool_t*> rows(rank);
    for (int64_t component = 0; component < rank; ++component)
        rows[component] = pool_b.data_ptr<pool_t>() + layer * pool_b.stride(0)
                          + destination.pages[component] * pool_b.stride(1) + first;
    const int64_t own_rank = lora_b.numel() ? lora_b.size(1) : 0;
    for (int64_t component = own_rank; component < rank; ++component)
        std::fill(rows[component], rows[component] + columns, pool_t(0));
    if (own_rank == 0) return;
    const weight_t* source = lora_b.data_ptr<weight_t>();
    float tile[kTileComponents][kTileRows];
    for (int64_t component = 0; component < own_rank; component += kTileComponents) {
        const int64_t components = std::min(kTileComponents, own_rank - component);
        for (int64_t start = 0; start < columns; start += kTileRows) {
            const int64_t count = std::min(kTileRows, columns - start);
            for (int64_t column = 0; column < count; ++column) {
                const weight_t* from = source + (start + column) * own_rank + component;
                for (int64_t index = 0; index < components; ++index) tile[index][column] = to_float(from[index]);
            }
            for (int64_t index = 0; index < components; ++index) {
                pool_t* to = rows[component + index] + start;
#pragma omp simd
                for (int64_t column = 0; column < count; ++column)
                    to[column] = from_float<pool_t>(tile[index][column] * scale);
            }
        }
    }
}

template <typename pool_t, typename weight_t>
void write(const Destination& destination, torch::Tensor& pool_a, torch::Tensor& pool_b,
           const std::vector<int64_t>& layers, const std::vector<int64_t>& slices,
           const std::vector<torch::Tensor>& lora_a, const std::vector<torch::Tensor>& lora_b,
           const std::vector<double>& scales) {
    for (size_t entry = 0; entry < layers.size(); ++entry) {
        write_a<pool_t, weight_t>(destination, pool_a, layers[entry], slices[entry], lora_a[entry]);
        write_b<pool_t, weight_t>(destination, pool_b, layers[entry], slices[entry], lora_b[entry],
                                  static_cast<float>(scales[entry]));
    }
}

}  // namespace

// The index of the first tensor holding NaN or an infinity, or -1 when every value is finite.
int64_t first_non_finite(const std::vector<torch::Tensor>& tensors) {
    for (size_t index = 0; index < tensors.size(); ++index)
        if (non_finite(tensors[index])) return static_cast<int64_t>(index);
    return -1;
}

// One fused projection of an adapter into its pages: entry i puts lora_a[i] ([rank_i, in], or empty for zeros)
// and lora_b[i] ([out of the slice, rank_i], or empty) times scales[i] at layers[i], slices[i] of pool_a [layers,
// pages, slices, in] and pool_b [layers, pages, out], rank component j in page pages[j] (zeros past rank_i).
void write_pages(torch::Tensor pool_a, torch::Tensor pool_b, const std::vector<int64_t>& pages,
                 const std::vector<int64_t>& slice_starts, const std::vector<int64_t>& layers,
                 const std::vector<int64_t>& slices, const std::vector<torch::Tensor>& lora_a,
                 const std::vector<torch::Tensor>& lora_b, const std::vector<double>& scales) {
    TORCH_CHECK(pool_a.dim() == 4 && pool_b.dim() == 3 && pool_a.stride(3) == 1 && pool_b.stride(2) == 1
                && pool_a.scalar_type() == pool_b.scalar_type(), "pools [layers, pages, slices, in] and "
                "[layers, pages, out] in one dtype, rows contiguous");
    TORCH_CHECK(layers.size() == slices.size() && layers.size() == lora_a.size() && layers.size() == lora_b.size()
                && layers.size() == scales.size(), "one layer, slice, A, B and scale per entry");
    TORCH_CHECK(static_cast<int64_t>(slice_starts.size()) == pool_a.size(2) + 1, "a start per slice, and the end");
    const int64_t rank = pages.size();
    auto weight_type = torch::kFloat;
    for (size_t entry = 0; entry < layers.size(); ++entry) {
        const auto &a = lora_a[entry], &b = lora_b[entry];
        TORCH_CHECK(0 <= layers[entry] && layers[entry] < pool_a.size(0) && 0 <= slices[entry]
                    && slices[entry] < pool_a.size(2), "layer and slice inside the pool");
        TORCH_CHECK((a.numel() == 0) == (b.numel() == 0), "A and B both given or both empty");
        if (a.numel() == 0) continue;
        const int64_t columns = slice_starts[slices[entry] + 1] - slice_starts[slices[entry]];
        TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && a.dim() == 2 && b.dim() == 2 && a.size(0) <= rank
                    && a.size(1) == pool_a.size(3) && b.size(0) == columns && b.size(1) == a.size(0)
                    && a.scalar_type() == b.scalar_type(), "A [rank_i, in] and B [out, rank_i] with rank_i at most "
                    "the pages given, contiguous, one dtype");
        weight_type = a.scalar_type();
    }
    for (int64_t page : pages) TORCH_CHECK(0 <= page && page < pool_a.size(1), "page inside the pool");
    const Destination destination{pages, slice_starts};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pool_a.scalar_type(), "write_pages", [&] {
        using pool_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight_type, "write_pages", [&] {
            write<pool_t, scalar_t>(destination, pool_a, pool_b, layers, slices, lora_a, lora_b, scales);
        });
    });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
    module.def("first_non_finite", &first_non_finite, "Index of the first tensor holding NaN or infinity, or -1",
               pybind11::call_guard<pybind11::gil_scoped_release>());
    module.def("write_pages", &write_pages, "One fused projection of an adapter into its pages",
               pybind11::call_guard<pybind11::gil_scoped_release>());
}
