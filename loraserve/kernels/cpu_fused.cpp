// The small element-wise steps of a decoder layer, each one pass over its tensors on the CPU: RMSNorm, SiLU times
// the up projection, and rotary embedding of the new queries and keys with the keys and values stored in the paged
// cache. In torch each is five to fifteen operators on tiny tensors, and at a decode's few tokens their dispatch,
// not their arithmetic, is what a step pays (about a third of it at batch 1 on a 2-core CPU). Float32 arithmetic
// whatever the dtype; the references are the torch forms in `fused.py`.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>

namespace {

template <typename scalar_t>
void rotate(const scalar_t* source, const float* cos, const float* sin, int64_t half, scalar_t* target) {
    for (int64_t index = 0; index < half; ++index) {
        const float first = static_cast<float>(source[index]), second = static_cast<float>(source[index + half]);
        target[index] = first * cos[index] - second * sin[index];
        target[index + half] = second * cos[index] + first * sin[index];
    }
}

}  // namespace

// Rows begin..end of RMSNorm (outside the dispatch macro: a pragma cannot sit in a macro's argument).
template <typename scalar_t>
void rms_norm_rows(const scalar_t* source, const scalar_t* scale, scalar_t* target, int64_t features, float eps,
                   int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
        const scalar_t* values = source + row * features;
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t index = 0; index < features; ++index)
            squares += static_cast<float>(values[index]) * static_cast<float>(values[index]);
        const float inverse = 1.0f / std::sqrt(squares / features + eps);
        for (int64_t index = 0; index < features; ++index)  // rounded to the dtype, then scaled, as HF
            target[row * features + index] = static_cast<float>(scale[index])
                * static_cast<float>(static_cast<scalar_t>(static_cast<float>(values[index]) * inverse));
    }
}

// weight * x / sqrt(mean(x^2) + eps), row by row: x [rows, features].
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && weight.is_contiguous() && x.scalar_type() == weight.scalar_type(),
                "contiguous rows and a weight of their dtype");
    auto output = torch::empty_like(x);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
        at::parallel_for(0, x.size(0), 4, [&](int64_t begin, int64_t end) {
            rms_norm_rows(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(), x.size(1),
                          static_cast<float>(eps), begin, end);
        });
    });
    return output;
}

// silu(gate) * up for x [rows, 2 * features] holding gate then up.
torch::Tensor silu_and_mul(torch::Tensor x) {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % 2 == 0, "contiguous rows of gate then up");
    const int64_t rows = x.size(0), features = x.size(1) / 2;
    auto output = torch::empty({rows, features}, x.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_and_mul", [&] {
        const scalar_t* source = x.data_ptr<scalar_t>();
        scalar_t* target = output.data_ptr<scalar_t>();
        at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
            for (int64_t row = begin; row < end; ++row) {
                const scalar_t *gate = source + row * 2 * features, *up = gate + features;
                for (int64_t index = 0; index < features; ++index) {
                    const float value = static_cast<float>(gate[index]);  // silu rounded to the dtype, as torch
                    const scalar_t activated = static_cast<scalar_t>(value / (1.0f + std::exp(-value)));
                    target[row * features + index] = static_cast<float>(activated) * static_cast<float>(up[index]);
                }
            }
        });
    });
    return output;
}

// qkv [tokens, (heads + 2 kv_heads) * head_dim]: returns the rotated queries [tokens, heads, head_dim] and stores
// the rotated keys and the values at each token's cache slot (caches [blocks, block_size, kv_heads, head_dim]; a
// negative slot is padding). cos and sin: [tokens, head_dim / 2] float32.
torch::Tensor rotate_and_cache(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor key_cache,
                               torch::Tensor value_cache, torch::Tensor slot_mapping, int64_t num_heads) {
    TORCH_CHECK(qkv.is_contiguous() && key_cache.is_contiguous() && value_cache.is_contiguous()
                && cos.is_contiguous() && sin.is_contiguous(), "contiguous projections, angles and caches");
    TORCH_CHECK(qkv.scalar_type() == key_cache.scalar_type() && cos.scalar_type() == torch::kFloat
                && slot_mapping.scalar_type() == torch::kLong, "caches in the projection's dtype, float32 angles");
    const int64_t tokens = qkv.size(0), num_kv_heads = key_cache.size(2), head_dim = key_cache.size(3);
    const int64_t half = head_dim / 2, width = (num_heads + 2 * num_kv_heads) * head_dim;
    TORCH_CHECK(qkv.size(1) == width, "qkv holds the query, key and value heads");
    auto query = torch::empty({tokens, num_heads, head_dim}, qkv.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rotate_and_cache", [&] {
        const scalar_t* source = qkv.data_ptr<scalar_t>();
        scalar_t *queries = query.data_ptr<scalar_t>(), *keys = key_cache.data_ptr<scalar_t>();
        scalar_t* values = value_cache.data_ptr<scalar_t>();
        const float *cosines = cos.data_ptr<float>(), *sines = sin.data_ptr<float>();
        const int64_t* slots = slot_mapping.data_ptr<int64_t>();
        at::parallel_for(0, tokens, 1, [&](int64_t begin, int64_t end) {
            for (int64_t token = begin; token < end; ++token) {
                const scalar_t* row = source + token * width;
                const float *token_cos = cosines + token * half, *token_sin = sines + token * half;
                for (int64_t head = 0; head < num_heads; ++head)
                    rotate(row + head * head_dim, token_cos, token_sin, half,
                           queries + (token * num_heads + head) * head_dim);
                if (slots[token] < 0) continue;
                const int64_t cache_row = slots[token] * num_kv_heads * head_dim;
                for (int64_t head = 0; head < num_kv_heads; ++head) {
                    rotate(row + (num_heads + head) * head_dim, token_cos, token_sin, half,
                           keys + cache_row + head * head_dim);
                    const scalar_t* value = row + (num_heads + num_kv_heads + head) * head_dim;
                    std::copy(value, value + head_dim, values + cache_row + head * head_dim);
                }
            }
        });
    });
    return query;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
    module.def("rms_norm", &rms_norm, "RMSNorm of each row");
    module.def("silu_and_mul", &silu_and_mul, "silu(gate) * up");
    module.def("rotate_and_cache", &rotate_and_cache, "Rotary queries; rotary keys and values into the paged cache");
}
