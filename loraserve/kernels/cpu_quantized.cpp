// y = x W^T for a weight held as integer codes in groups of 32 along the input, each group with a float16 scale:
// four-bit codes with a minimum too (w = code * scale + minimum: GGUF's Q4_1 as stored, Q4_0 as minimum = -8
// scale, or min-max quantization on load) or signed eight-bit ones (w = code * scale: GGUF's Q8_0 as stored, or
// absmax on load). Integer dot products per group as llama.cpp runs such weights, but with the activations
// quantized to int16 per group of 32 (absmax; their exact float sum kept for the minimum's term) rather than
// llama.cpp's int8: int8 activations cost the embedded model 2% of perplexity, int16 ones nothing measurable.
//
// The vector lanes hold output rows, not inputs: a tile of 16 output rows is one 512-bit vector of int32 sums (two
// 256-bit halves of 8 on AVX2), and each multiply-add (AVX-512 VNNI's dpwssd, or madd) adds two inputs' products
// for all 16 rows against one broadcast pair of activations. So a group's scale and minimum apply to 16 rows in
// one multiply-add, nothing is summed across lanes, and a tile's codes, unpacked once, serve every activation row:
// the weight is read at close to memory speed for one token, and reused from cache for more.
//
// Layout (`pack` in cpu_quantized.py builds it): codes [tiles, groups, chunks, 32] bytes. A four-bit group has 8
// chunks, chunk c covering input pairs 2c (low nibbles) and 2c + 1 (high nibbles); an eight-bit group has 16, chunk
// c covering pair c. Byte 2 r + b of a chunk holds row r's code for the pair's input b. Scales [tiles, groups, 16]
// float16, followed for four bits by the tile's 16 minimums. The reference is the dequantized weight times x in
// float64 (the tests).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define LORASERVE_AVX2 1
#endif
#if defined(LORASERVE_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__)
#define LORASERVE_AVX512 1
#endif

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kTile = 16;  // output rows per tile
constexpr float kLargest = 32767.0f;  // an activation group's largest magnitude, as an int16

template <int kBits>
struct Format {
    static constexpr int64_t kPairsPerChunk = kBits == 4 ? 2 : 1;
    static constexpr int64_t kChunks = kGroup / 2 / kPairsPerChunk;  // 32-byte chunks per tile and group
    static constexpr int64_t kBytes = kChunks * 32;  // codes per tile and group
    static constexpr int64_t kScales = kBits == 4 ? 2 * kTile : kTile;  // float16 scales (and minimums) per group
};

struct Activations {
    std::vector<int16_t> codes;  // [rows, in]
    std::vector<float> scales;  // [rows, groups]
    std::vector<float> sums;  // [rows, groups]: the group's exact float sum, for the minimum's term
    int64_t groups;

    const int32_t* pairs(int64_t row) const {
        return reinterpret_cast<const int32_t*>(codes.data()) + row * groups * kGroup / 2;
    }
};

template <typename scalar_t>
Activations quantize_rows(const scalar_t* x, int64_t rows, int64_t in_features) {
    const int64_t groups = in_features / kGroup;
    Activations result{std::vector<int16_t>(rows * in_features), std::vector<float>(rows * groups),
                       std::vector<float>(rows * groups), groups};
    for (int64_t group = 0; group < rows * groups; ++group) {
        const scalar_t* source = x + group * kGroup;
        float largest = 0.0f, total = 0.0f;
        for (int64_t index = 0; index < kGroup; ++index) {
            const float value = static_cast<float>(source[index]);
            largest = std::max(largest, std::fabs(value));
            total += value;
        }
        const float inverse = largest > 0.0f ? kLargest / largest : 0.0f;
        for (int64_t index = 0; index < kGroup; ++index)
            result.codes[group * kGroup + index] =
                static_cast<int16_t>(std::nearbyint(static_cast<float>(source[index]) * inverse));
        result.scales[group] = largest / kLargest;
        result.sums[group] = total;
    }
    return result;
}

// Where a tile's results go: rows of the output, of which the last tile may hold fewer than 16 columns.
struct TileOutput {
    float* first;  // row 0, the tile's first column
    int64_t stride, columns;

    void store(int64_t row, const float* values) const {
        std::memcpy(first + row * stride, values, columns * sizeof(float));
    }
};

#if defined(LORASERVE_AVX512)
constexpr int64_t kRowBlock = 8;  // activation rows whose sums live in registers together

// A chunk's codes as int16 lanes: one vector per input pair it covers.
template <int kBits>
inline void unpack(const uint8_t* chunk, __m512i* pairs) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk));
    if constexpr (kBits == 4) {
        const __m256i mask = _mm256_set1_epi8(0x0F);
        pairs[0] = _mm512_cvtepu8_epi16(_mm256_and_si256(raw, mask));
        pairs[1] = _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(raw, 4), mask));
    } else {
        pairs[0] = _mm512_cvtepi8_epi16(raw);
    }
}

inline __m512i multiply_add(__m512i sums, __m512i codes, int32_t activation_pair) {
#if defined(__AVX512VNNI__)
    return _mm512_dpwssd_epi32(sums, codes, _mm512_set1_epi32(activation_pair));
#else
    return _mm512_add_epi32(sums, _mm512_madd_epi16(codes, _mm512_set1_epi32(activation_pair)));
#endif
}

// Activation rows first..first+count of one tile, its codes and scales as laid out for one tile.
template <int kBits, int kCount>
void tile_rows(const uint8_t* codes, const at::Half* scales, const Activations& x, int64_t first,
               const TileOutput& out) {
    using F = Format<kBits>;
    __m512 totals[kCount];
    for (int64_t row = 0; row < kCount; ++row) totals[row] = _mm512_setzero_ps();
    for (int64_t group = 0; group < x.groups; ++group) {
        __m512i sums[kCount];
        for (int64_t row = 0; row < kCount; ++row) sums[row] = _mm512_setzero_si512();
        for (int64_t chunk = 0; chunk < F::kChunks; ++chunk) {
            __m512i pairs[F::kPairsPerChunk];
            unpack<kBits>(codes + chunk * 32, pairs);
            for (int64_t row = 0; row < kCount; ++row) {
                const int32_t* activations = x.pairs(first + row) + group * kGroup / 2 + chunk * F::kPairsPerChunk;
                for (int64_t pair = 0; pair < F::kPairsPerChunk; ++pair)
                    sums[row] = multiply_add(sums[row], pairs[pair], activations[pair]);
            }
        }
        const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales)));
        for (int64_t row = 0; row < kCount; ++row) {
            const int64_t index = (first + row) * x.groups + group;
            totals[row] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[row]),
                                          _mm512_mul_ps(scale, _mm512_set1_ps(x.scales[index])), totals[row]);
        }
        if constexpr (kBits == 4) {
            const __m512 minimum =
                _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + kTile)));
            for (int64_t row = 0; row < kCount; ++row)
                totals[row] = _mm512_fmadd_ps(minimum, _mm512_set1_ps(x.sums[(first + row) * x.groups + group]),
                                              totals[row]);
        }
        codes += F::kBytes;
        scales += F::kScales;
    }
    for (int64_t row = 0; row < kCount; ++row) {
        alignas(64) float values[kTile];
        _mm512_store_ps(values, totals[row]);
        out.store(first + row, values);
    }
}
#elif defined(LORASERVE_AVX2)
constexpr int64_t kRowBlock = 4;  // two halves of 8 output rows each: 16 registers of sums

template <int kBits>
inline void unpack(const uint8_t* half_chunk, __m256i* pairs) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(half_chunk));
    if constexpr (kBits == 4) {
        const __m128i mask = _mm_set1_epi8(0x0F);
        pairs[0] = _mm256_cvtepu8_epi16(_mm_and_si128(raw, mask));
        pairs[1] = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), mask));
    } else {
        pairs[0] = _mm256_cvtepi8_epi16(raw);
    }
}

inline __m256i multiply_add(__m256i sums, __m256i codes, int32_t activation_pair) {
#if defined(__AVXVNNI__)
    return _mm256_dpwssd_avx_epi32(sums, codes, _mm256_set1_epi32(activation_pair));
#else
    return _mm256_add_epi32(sums, _mm256_madd_epi16(codes, _mm256_set1_epi32(activation_pair)));
#endif
}

inline __m256 load_halves(const at::Half* values) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(values)));
}

template <int kBits, int kCount>
void tile_rows(const uint8_t* codes, const at::Half* scales, const Activations& x, int64_t first,
               const TileOutput& out) {
    using F = Format<kBits>;
    __m256 totals[kCount][2];
    for (int64_t row = 0; row < kCount; ++row) totals[row][0] = totals[row][1] = _mm256_setzero_ps();
    for (int64_t group = 0; group < x.groups; ++group) {
        for (int64_t half = 0; half < 2; ++half) {
            __m256i sums[kCount];
            for (int64_t row = 0; row < kCount; ++row) sums[row] = _mm256_setzero_si256();
            for (int64_t chunk = 0; chunk < F::kChunks; ++chunk) {
                __m256i pairs[F::kPairsPerChunk];
                unpack<kBits>(codes + chunk * 32 + half * 16, pairs);
                for (int64_t row = 0; row < kCount; ++row) {
                    const int32_t* activations =
                        x.pairs(first + row) + group * kGroup / 2 + chunk * F::kPairsPerChunk;
                    for (int64_t pair = 0; pair < F::kPairsPerChunk; ++pair)
                        sums[row] = multiply_add(sums[row], pairs[pair], activations[pair]);
                }
            }
            const __m256 scale = load_halves(scales + half * 8);
            for (int64_t row = 0; row < kCount; ++row) {
                const int64_t index = (first + row) * x.groups + group;
                __m256& total = totals[row][half];
                total = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[row]),
                                        _mm256_mul_ps(scale, _mm256_set1_ps(x.scales[index])), total);
                if constexpr (kBits == 4)
                    total = _mm256_fmadd_ps(load_halves(scales + kTile + half * 8), _mm256_set1_ps(x.sums[index]),
                                            total);
            }
        }
        codes += F::kBytes;
        scales += F::kScales;
    }
    for (int64_t row = 0; row < kCount; ++row) {
        alignas(32) float values[kTile];
        _mm256_store_ps(values, totals[row][0]);
        _mm256_store_ps(values + 8, totals[row][1]);
        out.store(first + row, values);
    }
}
#else
constexpr int64_t kRowBlock = 1;

inline int32_t code(uint8_t byte, int64_t pair, std::integral_constant<int, 4>) {
    return pair == 0 ? byte & 0x0F : byte >> 4;
}
inline int32_t code(uint8_t byte, int64_t, std::integral_constant<int, 8>) { return static_cast<int8_t>(byte); }

template <int kBits, int kCount>
void tile_rows(const uint8_t* codes, const at::Half* scales, const Activations& x, int64_t first,
               const TileOutput& out) {
    using F = Format<kBits>;
    float values[kTile] = {};
    const int16_t* activations = x.codes.data() + first * x.groups * kGroup;
    for (int64_t group = 0; group < x.groups; ++group) {
        int32_t sums[kTile] = {};
        for (int64_t chunk = 0; chunk < F::kChunks; ++chunk)
            for (int64_t pair = 0; pair < F::kPairsPerChunk; ++pair)
                for (int64_t lane = 0; lane < 2 * kTile; ++lane) {
                    const int64_t input = group * kGroup + (chunk * F::kPairsPerChunk + pair) * 2 + lane % 2;
                    sums[lane / 2] += code(codes[chunk * 32 + lane], pair, std::integral_constant<int, kBits>())
                                      * activations[input];
                }
        const int64_t index = first * x.groups + group;
        for (int64_t row = 0; row < kTile; ++row) {
            values[row] += static_cast<float>(scales[row]) * x.scales[index] * sums[row];
            if constexpr (kBits == 4) values[row] += static_cast<float>(scales[kTile + row]) * x.sums[index];
        }
        codes += F::kBytes;
        scales += F::kScales;
    }
    out.store(first, values);
}
#endif

// Rows first..first+count (at most kRowBlock) with the count known when compiled, so every row's sums stay in
// registers through the unrolled row loops.
template <int kBits, int kCount = kRowBlock>
void row_block(const uint8_t* codes, const at::Half* scales, const Activations& x, int64_t first, int64_t count,
               const TileOutput& out) {
    if constexpr (kCount > 1) {
        if (count < kCount) return row_block<kBits, kCount - 1>(codes, scales, x, first, count, out);
    }
    tile_rows<kBits, kCount>(codes, scales, x, first, out);
}

template <int kBits>
void all_tiles(const uint8_t* codes, const at::Half* scales, const Activations& x, int64_t rows, int64_t tiles,
               int64_t out_features, float* out) {
    const int64_t tile_bytes = x.groups * Format<kBits>::kBytes, tile_scales = x.groups * Format<kBits>::kScales;
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
        for (int64_t tile = begin; tile < end; ++tile) {
            const TileOutput target{out + tile * kTile, out_features, std::min(kTile, out_features - tile * kTile)};
            for (int64_t first = 0; first < rows; first += kRowBlock)
                row_block<kBits>(codes + tile * tile_bytes, scales + tile * tile_scales, x, first,
                                 std::min(kRowBlock, rows - first), target);
        }
    });
}

}  // namespace

// x [rows, in] (float32, bfloat16 or float16) times a weight of `out_features` rows packed by `pack`.
torch::Tensor quantized_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, int64_t out_features,
                               int64_t bits) {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && codes.is_contiguous() && scales.is_contiguous(),
                "contiguous 2-d activations, codes and scales");
    TORCH_CHECK(codes.scalar_type() == torch::kByte && scales.scalar_type() == torch::kHalf,
                "uint8 codes and float16 scales");
    TORCH_CHECK(bits == 4 || bits == 8, "four or eight bits");
    const int64_t rows = x.size(0), in_features = x.size(1), tiles = codes.size(0), groups = in_features / kGroup;
    const int64_t group_bytes = bits == 4 ? Format<4>::kBytes : Format<8>::kBytes;
    const int64_t group_scales = bits == 4 ? Format<4>::kScales : Format<8>::kScales;
    TORCH_CHECK(in_features % kGroup == 0 && codes.size(1) == groups * group_bytes && scales.size(0) == tiles
                && scales.size(1) == groups * group_scales && (out_features + kTile - 1) / kTile == tiles,
                "the tiled layout of cpu_quantized.pack");
    Activations activations;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "quantized_linear", [&] {
        activations = quantize_rows(x.data_ptr<scalar_t>(), rows, in_features);
    });
    auto output = torch::empty({rows, out_features}, x.options().dtype(torch::kFloat));
    const uint8_t* code_data = codes.data_ptr<uint8_t>();
    const at::Half* scale_data = scales.data_ptr<at::Half>();
    if (bits == 4)
        all_tiles<4>(code_data, scale_data, activations, rows, tiles, out_features, output.data_ptr<float>());
    else
        all_tiles<8>(code_data, scale_data, activations, rows, tiles, out_features, output.data_ptr<float>());
    return output.to(x.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
    module.def("quantized_linear", &quantized_linear, "x W^T for grouped 4- or 8-bit codes with float16 scales",
               pybind11::call_guard<pybind11::gil_scoped_release>());
}
