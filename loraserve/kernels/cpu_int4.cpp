// y = x W^T for a weight held as 4-bit codes in groups of 32 along the input, each group with a scale and a
// minimum (GGUF's Q4_1, or min-max quantization on load): w = code * scale + minimum. Integer dot products per
// group, as llama.cpp runs such weights on a CPU, but with the activations quantized to int16 per group of 32
// (absmax; their exact float sum kept for the minimum's term) rather than llama.cpp's int8: int8 activations cost
// the embedded model 2% of perplexity, int16 ones nothing measurable. Each group's 32 products are two
// multiply-adds of 16-bit lanes (AVX-VNNI's dpwssd, or AVX2's madd), scaled once per group into float sums.
//
// Codes are packed two to a byte, byte j of a group holding code j (low nibble) and code j + 16 (high): one load
// and two masks give a group's 32 codes in order. Parallel over output rows; each row's codes are unpacked once
// for all the activation rows. The reference is the dequantized weight times x in float64 (the tests).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kRowTile = 8;  // activation rows whose accumulators live together
constexpr float kLargest = 32767.0f;  // an activation group's largest magnitude, as an int16

struct Activations {
    std::vector<int16_t> codes;  // [rows, in]
    std::vector<float> scales;  // [rows, groups]
    std::vector<float> sums;  // [rows, groups]: the group's exact float sum, for the minimum's term
};

template <typename scalar_t>
Activations quantize_rows(const scalar_t* x, int64_t rows, int64_t in_features) {
    const int64_t groups = in_features / kGroup;
    Activations result{std::vector<int16_t>(rows * in_features), std::vector<float>(rows * groups),
                       std::vector<float>(rows * groups)};
    for (int64_t group = 0; group < rows * groups; ++group) {
        const scalar_t* source = x + group * kGroup;
        float largest = 0.0f, total = 0.0f;
        for (int64_t index = 0; index < kGroup; ++index) {
            const float value = static_cast<float>(source[index]);
            largest = std::max(largest, std::fabs(value));
            total += value;
        }
        const float scale = largest / kLargest, inverse = largest > 0.0f ? kLargest / largest : 0.0f;
        for (int64_t index = 0; index < kGroup; ++index)
            result.codes[group * kGroup + index] =
                static_cast<int16_t>(std::nearbyint(static_cast<float>(source[index]) * inverse));
        result.scales[group] = scale;
        result.sums[group] = total;
    }
    return result;
}

#if defined(__AVX2__)
// The 32 codes of a group, in order, as two vectors of 16 int16 lanes.
struct GroupCodes {
    __m256i low, high;
};

inline GroupCodes unpack_group(const uint8_t* packed) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed));
    const __m128i mask = _mm_set1_epi8(0x0F);
    return {_mm256_cvtepu8_epi16(_mm_and_si128(raw, mask)),
            _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), mask))};
}

// Eight int32 partial sums of the codes times a group of int16 activations.
inline __m256i dot_group(const GroupCodes& codes, const int16_t* activations) {
    const __m256i low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(activations));
    const __m256i high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(activations + kGroup / 2));
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
    return _mm256_dpwssd_epi32(_mm256_madd_epi16(codes.low, low), codes.high, high);
#else
    return _mm256_add_epi32(_mm256_madd_epi16(codes.low, low), _mm256_madd_epi16(codes.high, high));
#endif
}

inline float sum_lanes(__m256 vector) {
    const __m128 half = _mm_add_ps(_mm256_castps256_ps128(vector), _mm256_extractf128_ps(vector, 1));
    const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_shuffle_ps(quarter, quarter, 1)));
}

// Output column `row` of the weight for activation rows first..first+count.
void weight_row(const uint8_t* packed, const float* scale_min, const Activations& x, int64_t groups, int64_t first,
                int64_t count, float* out, int64_t out_stride) {
    __m256 totals[kRowTile];
    float minimum_terms[kRowTile] = {};
    for (int64_t row = 0; row < count; ++row) totals[row] = _mm256_setzero_ps();
    for (int64_t group = 0; group < groups; ++group) {
        const GroupCodes codes = unpack_group(packed + group * kGroup / 2);
        const float scale = scale_min[2 * group], minimum = scale_min[2 * group + 1];
        for (int64_t row = 0; row < count; ++row) {
            const int64_t index = (first + row) * groups + group;
            const __m256 products = _mm256_cvtepi32_ps(dot_group(codes, x.codes.data() + index * kGroup));
            totals[row] = _mm256_fmadd_ps(products, _mm256_set1_ps(scale * x.scales[index]), totals[row]);
            minimum_terms[row] += minimum * x.sums[index];
        }
    }
    for (int64_t row = 0; row < count; ++row) out[row * out_stride] = sum_lanes(totals[row]) + minimum_terms[row];
}
#else
void weight_row(const uint8_t* packed, const float* scale_min, const Activations& x, int64_t groups, int64_t first,
                int64_t count, float* out, int64_t out_stride) {
    for (int64_t row = 0; row < count; ++row) {
        float total = 0.0f;
        for (int64_t group = 0; group < groups; ++group) {
            const int64_t index = (first + row) * groups + group;
            const uint8_t* bytes = packed + group * kGroup / 2;
            const int16_t* values = x.codes.data() + index * kGroup;
            int32_t dot = 0;
            for (int64_t byte = 0; byte < kGroup / 2; ++byte)
                dot += (bytes[byte] & 0x0F) * values[byte] + (bytes[byte] >> 4) * values[byte + kGroup / 2];
            total += scale_min[2 * group] * x.scales[index] * dot + scale_min[2 * group + 1] * x.sums[index];
        }
        out[row * out_stride] = total;
    }
}
#endif

}  // namespace

// x [rows, in] (float32, bfloat16 or float16) times the packed weight [out, in / 2] with scale_min [out, in / 32, 2].
torch::Tensor int4_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scale_min) {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && packed.is_contiguous() && scale_min.is_contiguous(),
                "contiguous 2-d activations, codes and scales");
    TORCH_CHECK(packed.scalar_type() == torch::kByte && scale_min.scalar_type() == torch::kFloat,
                "uint8 codes and float32 scales");
    const int64_t rows = x.size(0), in_features = x.size(1), out_features = packed.size(0);
    TORCH_CHECK(in_features % kGroup == 0 && packed.size(1) * 2 == in_features
                && scale_min.size(1) == in_features / kGroup, "groups of 32 along the input");
    Activations activations;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "int4_linear", [&] {
        activations = quantize_rows(x.data_ptr<scalar_t>(), rows, in_features);
    });
    auto output = torch::empty({rows, out_features}, x.options().dtype(torch::kFloat));
    const int64_t groups = in_features / kGroup;
    const uint8_t* codes = packed.data_ptr<uint8_t>();
    const float* scales = scale_min.data_ptr<float>();
    float* out = output.data_ptr<float>();
    at::parallel_for(0, out_features, 16, [&](int64_t begin, int64_t end) {
        for (int64_t column = begin; column < end; ++column)
            for (int64_t first = 0; first < rows; first += kRowTile)
                weight_row(codes + column * in_features / 2, scales + column * groups * 2, activations, groups, first,
                           std::min(kRowTile, rows - first), out + first * out_features + column, out_features);
    });
    return output.to(x.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
    module.def("int4_linear", &int4_linear, "x W^T for 4-bit grouped codes with scales and minimums");
}
