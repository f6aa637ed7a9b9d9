// Paged attention on the CPU for steps of short queries (decodes, and drafts being verified): each query row reads
// its sequence's keys and values where they lie in the paged cache, through the block table. The torch path
// gathers every sequence's context into a padded batch, builds a mask and runs a masked SDPA in every layer, which
// on a small CPU costs more than the attention itself.
//
// One task per (sequence, key/value head): the query heads that share a key/value head (grouped-query attention)
// read each key and value row once between them. Scores and sums in float32, whatever the cache's dtype; the
// reference is `paged_attention_reference` (and a float64 computation in the tests).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

struct Layout {
    int64_t num_heads, num_kv_heads, head_dim, block_size, table_stride;
    const int32_t* block_tables;  // [sequences, table_stride]
    const int32_t* seq_lens;  // [sequences]: context length, the new tokens included
    const int32_t* query_start;  // [sequences + 1]
    float scale;
};

template <typename scalar_t>
float dot(const float* query, const scalar_t* key, int64_t length) {
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t index = 0; index < length; ++index) total += query[index] * static_cast<float>(key[index]);
    return total;
}

// exp(value - largest) of 16 floats at once (Cephes' expf: 2^n times a degree-6 polynomial on [-ln 2 / 2,
// ln 2 / 2], relative error near 1e-7), written with GCC's vector types so one source serves AVX-512 and AVX2:
// the scalar std::exp was most of a decode's attention time.
typedef float Floats __attribute__((vector_size(64)));
typedef int32_t Ints __attribute__((vector_size(64)));

inline Floats exp_below_zero(Floats x) {
    x = x < -87.0f ? Floats{} - 87.0f : x;  // exp(-87) is 1.6e-38: still a normal float, and no weight
    Floats scaled = x * 1.44269504088896341f + 0.5f;
    Floats whole = __builtin_convertvector(__builtin_convertvector(scaled, Ints), Floats);
    whole = whole > scaled ? whole - 1.0f : whole;  // floor, for the negative ones truncation rounded up
    x = x - whole * 0.693359375f + whole * 2.12194440e-4f;
    Floats polynomial = 1.9875691500e-4f * x + 1.3981999507e-3f;
    polynomial = polynomial * x + 8.3334519073e-3f;
    polynomial = polynomial * x + 4.1665795894e-2f;
    polynomial = polynomial * x + 1.6666665459e-1f;
    polynomial = polynomial * x + 5.0000001201e-1f;
    polynomial = polynomial * x * x + x + 1.0f;
    const Ints exponent = (__builtin_convertvector(whole, Ints) + 127) << 23;
    Floats power;
    std::memcpy(&power, &exponent, sizeof(power));
    return polynomial * power;
}

// Each row of scores [group, visible] turned into softmax weights in place, so the value pass only multiplies and
// adds.
void softmax_rows(float* scores, int64_t group, int64_t visible) {
    constexpr int64_t kLanes = sizeof(Floats) / sizeof(float);
    for (int64_t head = 0; head < group; ++head) {
        float* row = scores + head * visible;
        float largest = -INFINITY;
        for (int64_t key = 0; key < visible; ++key) largest = std::max(largest, row[key]);
        float total = 0.0f;
        int64_t key = 0;
        for (; key + kLanes <= visible; key += kLanes) {
            Floats values;
            std::memcpy(&values, row + key, sizeof(values));
            values = exp_below_zero(values - largest);
            std::memcpy(row + key, &values, sizeof(values));
            for (int64_t lane = 0; lane < kLanes; ++lane) total += values[lane];
        }
        for (; key < visible; ++key) {
            row[key] = std::exp(row[key] - largest);
            total += row[key];
        }
        const float inverse = 1.0f / total;
        for (int64_t key = 0; key < visible; ++key) row[key] *= inverse;
    }
}

inline float sum_lanes(Floats values) {
#if defined(__AVX512F__)
    __m512 vector;
    std::memcpy(&vector, &values, sizeof(vector));
    return _mm512_reduce_add_ps(vector);
#else
    float total = 0.0f;
    for (int64_t lane = 0; lane < 16; ++lane) total += values[lane];
    return total;
#endif
}

inline Floats load(const float* source) {
    Floats values;
    std::memcpy(&values, source, sizeof(values));
    return values;
}

// 16 bfloat16 values as floats: a bfloat16 is the top half of the float it rounds, so widening each to 32 bits and
// shifting it up is exact.
inline Floats load(const c10::BFloat16* source) {
    typedef uint16_t Halves __attribute__((vector_size(32)));
    Halves halves;
    std::memcpy(&halves, source, sizeof(halves));
    const Ints bits = __builtin_convertvector(halves, Ints) << 16;
    Floats values;
    std::memcpy(&values, &bits, sizeof(values));
    return values;
}

// The scores of `count` keys (a stride apart) for each query head of a group, into scores[head * visible]: a
// head_dim known when compiled (64, 128) keeps each key in registers for every head, one lane sum per score.
template <int kDim, typename scalar_t>
void score_keys(const float* queries, const scalar_t* keys, int64_t stride, int64_t count, int64_t group,
                float* scores, int64_t visible) {
    for (int64_t slot = 0; slot < count; ++slot) {
        Floats key[kDim / 16];
        for (int64_t part = 0; part < kDim / 16; ++part) key[part] = load(keys + slot * stride + part * 16);
        for (int64_t head = 0; head < group; ++head) {
            Floats total = key[0] * load(queries + head * kDim);
            for (int64_t part = 1; part < kDim / 16; ++part)
                total += key[part] * load(queries + head * kDim + part * 16);
            scores[head * visible + slot] = sum_lanes(total);
        }
    }
}

// sums[head] += weights[head * visible + slot] * value[slot] over `count` values, each head's sums in registers.
template <int kDim, typename scalar_t>
void add_values(const float* weights, const scalar_t* values, int64_t stride, int64_t count, int64_t group,
                float* sums, int64_t visible) {
    for (int64_t head = 0; head < group; ++head) {
        Floats total[kDim / 16];
        for (int64_t part = 0; part < kDim / 16; ++part) total[part] = load(sums + head * kDim + part * 16);
        for (int64_t slot = 0; slot < count; ++slot) {
            const float weight = weights[head * visible + slot];
            for (int64_t part = 0; part < kDim / 16; ++part)
                total[part] += weight * load(values + slot * stride + part * 16);
        }
        std::memcpy(sums + head * kDim, total, sizeof(total));
    }
}

// The same for any element type and head_dim, one dot product or row at a time.
template <typename scalar_t>
void score_keys_any(const float* queries, const scalar_t* keys, int64_t stride, int64_t count, int64_t group,
                    float* scores, int64_t visible, int64_t head_dim) {
    for (int64_t slot = 0; slot < count; ++slot)
        for (int64_t head = 0; head < group; ++head)
            scores[head * visible + slot] = dot(queries + head * head_dim, keys + slot * stride, head_dim);
}

template <typename scalar_t>
void add_values_any(const float* weights, const scalar_t* values, int64_t stride, int64_t count, int64_t group,
                    float* sums, int64_t visible, int64_t head_dim) {
    for (int64_t slot = 0; slot < count; ++slot)
        for (int64_t head = 0; head < group; ++head) {
            const float weight = weights[head * visible + slot];
            float* target = sums + head * head_dim;
            const scalar_t* value = values + slot * stride;
#pragma omp simd
            for (int64_t index = 0; index < head_dim; ++index)
                target[index] += weight * static_cast<float>(value[index]);
        }
}

// Calls `fixed` with the head_dim as a compile-time constant where a kernel above has that size for this element
// type (float32 and bfloat16 caches, head_dim 64 or 128), else `any`.
template <typename scalar_t, typename Fixed, typename Any>
void by_head_dim(int64_t head_dim, Fixed fixed, Any any) {
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
        if (head_dim == 64) return fixed(std::integral_constant<int, 64>());
        if (head_dim == 128) return fixed(std::integral_constant<int, 128>());
    }
    any();
}

// Every query row of one sequence, for the query heads of one key/value head.
template <typename scalar_t>
void attend(const Layout& layout, const scalar_t* query, const scalar_t* key_cache, const scalar_t* value_cache,
            scalar_t* output, int64_t sequence, int64_t kv_head, std::vector<float>& scores,
            std::vector<float>& queries, std::vector<float>& sums) {
    const int64_t group = layout.num_heads / layout.num_kv_heads, head_dim = layout.head_dim;
    const int64_t first_row = layout.query_start[sequence], last_row = layout.query_start[sequence + 1];
    const int64_t context = layout.seq_lens[sequence], query_length = last_row - first_row;
    const int32_t* table = layout.block_tables + sequence * layout.table_stride;
    const int64_t row_stride = layout.num_kv_heads * head_dim;  // between a block's consecutive slots
    for (int64_t row = first_row; row < last_row; ++row) {
        const int64_t visible = context - query_length + (row - first_row) + 1;  // causal: up to its own position
        scores.resize(group * visible);
        queries.resize(group * head_dim);
        sums.assign(group * head_dim, 0.0f);
        for (int64_t head = 0; head < group; ++head) {
            const scalar_t* source = query + (row * layout.num_heads + kv_head * group + head) * head_dim;
            for (int64_t index = 0; index < head_dim; ++index)
                queries[head * head_dim + index] = static_cast<float>(source[index]) * layout.scale;
        }
        for (int64_t start = 0; start < visible; start += layout.block_size) {
            const int64_t block = table[start / layout.block_size];
            const int64_t count = std::min(layout.block_size, visible - start);
            const scalar_t* keys = key_cache + (block * layout.block_size * layout.num_kv_heads + kv_head) * head_dim;
            const float* query_rows = queries.data();
            float* block_scores = scores.data() + start;
            by_head_dim<scalar_t>(
                head_dim,
                [&](auto dim) { score_keys<dim>(query_rows, keys, row_stride, count, group, block_scores, visible); },
                [&] { score_keys_any(query_rows, keys, row_stride, count, group, block_scores, visible, head_dim); });
        }
        softmax_rows(scores.data(), group, visible);
        for (int64_t start = 0; start < visible; start += layout.block_size) {
            const int64_t block = table[start / layout.block_size];
            const int64_t count = std::min(layout.block_size, visible - start);
            const scalar_t* values =
                value_cache + (block * layout.block_size * layout.num_kv_heads + kv_head) * head_dim;
            const float* weights = scores.data() + start;
            by_head_dim<scalar_t>(
                head_dim,
                [&](auto dim) { add_values<dim>(weights, values, row_stride, count, group, sums.data(), visible); },
                [&] { add_values_any(weights, values, row_stride, count, group, sums.data(), visible, head_dim); });
        }
        for (int64_t head = 0; head < group; ++head) {
            scalar_t* target = output + (row * layout.num_heads + kv_head * group + head) * head_dim;
            for (int64_t index = 0; index < head_dim; ++index) target[index] = sums[head * head_dim + index];
        }
    }
}

}  // namespace

// query [tokens, heads, head_dim] over caches [blocks, block_size, kv_heads, head_dim] -> [tokens, heads, head_dim].
torch::Tensor paged_attention(torch::Tensor query, torch::Tensor key_cache, torch::Tensor value_cache,
                              torch::Tensor block_tables, torch::Tensor seq_lens, torch::Tensor query_start_loc,
                              double scale) {
    TORCH_CHECK(query.scalar_type() == key_cache.scalar_type() && key_cache.scalar_type() == value_cache.scalar_type(),
                "query and caches in one dtype");
    TORCH_CHECK(query.is_contiguous() && key_cache.is_contiguous() && value_cache.is_contiguous()
                && block_tables.is_contiguous(), "contiguous query, caches and block tables");
    TORCH_CHECK(block_tables.scalar_type() == torch::kInt && seq_lens.scalar_type() == torch::kInt
                && query_start_loc.scalar_type() == torch::kInt, "int32 block tables, lengths and starts");
    TORCH_CHECK(query.size(1) % key_cache.size(2) == 0, "query heads split evenly over key/value heads");
    const Layout layout{query.size(1), key_cache.size(2), query.size(2), key_cache.size(1), block_tables.size(1),
                        block_tables.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(),
                        query_start_loc.data_ptr<int32_t>(), static_cast<float>(scale)};
    auto output = torch::empty_like(query);
    const int64_t num_sequences = seq_lens.size(0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_attention", [&] {
        at::parallel_for(0, num_sequences * layout.num_kv_heads, 1, [&](int64_t begin, int64_t end) {
            std::vector<float> scores, queries, sums;
            for (int64_t task = begin; task < end; ++task)
                attend(layout, query.data_ptr<scalar_t>(), key_cache.data_ptr<scalar_t>(),
                       value_cache.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(), task / layout.num_kv_heads,
                       task % layout.num_kv_heads, scores, queries, sums);
        });
    });
    return output;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
    module.def("paged_attention", &paged_attention, "Causal attention of short queries through the paged KV cache",
               pybind11::call_guard<pybind11::gil_scoped_release>());
}
