// LoRA for the tokens of many adapters in one call per projection, on the CPU: SGMV (Punica, S-LoRA) for a
// machine whose per-operation cost, not its arithmetic, is what many small matrix products pay.
//
// Tokens come sorted by adapter slot (groups). Each adapter's weights sit in pages (one rank component each) that
// the kernel reads through the slot's row of the page table, where they lie (an adapter's pages are mostly
// consecutive, one span of a layer's pool): no gather, no padding to the largest rank. The shrink reads each A row once per group
// and dots it with the group's tokens (kept in cache); the expand reads each B row once per group and adds it,
// scaled by each token's shrunk value, into a block of the token's output columns. Both loops are parallel over
// the torch intra-op pool; each token is in one group and output blocks are disjoint, so nothing races.
// Accumulates in float32; the reference is `add_lora_reference`. Weights are in the inputs' dtype, or in 16 bits
// under float32 inputs (a quantized base's adapters: half the bytes a memory-bound step reads).
#include <torch/extension.h>
#include <ATen/Parallel.h>

namespace {

// Output columns per expand task: as many as keep a group's float32 sums within kSumsBudget (whole rows for a
// decode's group, so each B row streams in one contiguous read), but no fewer than kMinColumnBlock, and fewer when
// the threads would otherwise lack tasks.
constexpr int64_t kSumsBudget = 16384;
constexpr int64_t kMinColumnBlock = 128;
// The rows of up to kUnroll rank components at once: each x or output element loaded once feeds all of them.
constexpr int64_t kUnroll = 4;

template <typename scalar_t, typename weight_t>
void dot_rows(const scalar_t* x_row, const weight_t* const* a_rows, int64_t count, int64_t length, float* totals) {
    float sums[kUnroll] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (count == kUnroll) {
        const weight_t *a0 = a_rows[0], *a1 = a_rows[1], *a2 = a_rows[2], *a3 = a_rows[3];
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int64_t index = 0; index < length; ++index) {
            const float value = static_cast<float>(x_row[index]);
            s0 += value * static_cast<float>(a0[index]);
            s1 += value * static_cast<float>(a1[index]);
            s2 += value * static_cast<float>(a2[index]);
            s3 += value * static_cast<float>(a3[index]);
        }
        sums[0] = s0, sums[1] = s1, sums[2] = s2, sums[3] = s3;
    } else {
        for (int64_t row = 0; row < count; ++row) {
            float total = 0.0f;
            const weight_t* a_row = a_rows[row];
#pragma omp simd reduction(+ : total)
            for (int64_t index = 0; index < length; ++index)
                total += static_cast<float>(x_row[index]) * static_cast<float>(a_row[index]);
            sums[row] = total;
        }
    }
    for (int64_t row = 0; row < count; ++row) totals[row] = sums[row];
}

template <typename weight_t>
void add_rows(float* target, const weight_t* const* b_rows, const float* scales, int64_t count, int64_t length) {
    if (count == kUnroll) {
        const weight_t *b0 = b_rows[0], *b1 = b_rows[1], *b2 = b_rows[2], *b3 = b_rows[3];
        const float s0 = scales[0], s1 = scales[1], s2 = scales[2], s3 = scales[3];
#pragma omp simd
        for (int64_t index = 0; index < length; ++index)
            target[index] += s0 * static_cast<float>(b0[index]) + s1 * static_cast<float>(b1[index])
                             + s2 * static_cast<float>(b2[index]) + s3 * static_cast<float>(b3[index]);
        return;
    }
    for (int64_t row = 0; row < count; ++row) {
        const weight_t* b_row = b_rows[row];
        const float scale = scales[row];
#pragma omp simd
        for (int64_t index = 0; index < length; ++index) target[index] += scale * static_cast<float>(b_row[index]);
    }
}

// Which tokens use which slot, and where each slot's pages are: what both passes read.
struct Groups {
    const int64_t* pages;  // [slots, pages_stride]: rank component j of a slot is page pages[slot, j]
    int64_t pages_stride;
    const int32_t* rank_of;  // [slots]: each slot's rank in this projection, 0 where it is not adapted
    const int64_t* rows;  // token rows, sorted by group
    const int32_t* starts;  // [groups + 1]: each group's first index into rows
    const int32_t* slots;  // [groups]
    int64_t count;
    int64_t max_rank;  // the largest rank among the groups' slots

    int64_t page(int64_t slot, int64_t component) const { return pages[slot * pages_stride + component]; }
};

// shrunk[token, slice, j] = x[rows[token]] . A_j, the A row of the slice in rank component j's page.
template <typename scalar_t, typename weight_t>
void shrink(const Groups& groups, const scalar_t* x, const weight_t* lora_a, int64_t page_stride,
            int64_t num_slices, int64_t in_features, float* shrunk) {
    const int64_t num_quads = (groups.max_rank + kUnroll - 1) / kUnroll;
    at::parallel_for(0, groups.count * num_quads, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
            const int64_t group = task / num_quads, first = task % num_quads * kUnroll, slot = groups.slots[group];
            const int64_t count = std::min<int64_t>(kUnroll, groups.rank_of[slot] - first);
            for (int64_t slice = 0; slice < num_slices && count > 0; ++slice) {
                const weight_t* a_rows[kUnroll];
                for (int64_t row = 0; row < count; ++row)
                    a_rows[row] = lora_a + groups.page(slot, first + row) * page_stride + slice * in_features;
                for (int64_t token = groups.starts[group]; token < groups.starts[group + 1]; ++token)
                    dot_rows(x + groups.rows[token] * in_features, a_rows, count, in_features,
                             shrunk + (token * num_slices + slice) * groups.max_rank + first);
            }
        }
    });
}

int64_t column_block(const Groups& groups, int64_t out_features) {
    int64_t longest = 1;
    for (int64_t group = 0; group < groups.count; ++group)
        longest = std::max<int64_t>(longest, groups.starts[group + 1] - groups.starts[group]);
    int64_t block = std::clamp<int64_t>(kSumsBudget / longest, kMinColumnBlock, std::max(out_features, kMinColumnBlock));
    const int64_t wanted_tasks = 4 * at::get_num_threads();
    while (block > kMinColumnBlock && groups.count * ((out_features + block - 1) / block) < wanted_tasks)
        block = std::max(kMinColumnBlock, block / 2);
    return block;
}

// output[rows[token], block] += sum_j shrunk[token, slice of the column, j] B_j[block], summed in float32 for a
// block of columns (`column_block`) and all of a group's tokens, then added to the output once.
template <typename scalar_t, typename weight_t>
void expand(const Groups& groups, const float* shrunk, const weight_t* lora_b, int64_t page_stride,
            const int32_t* slice_ends, int64_t num_slices, int64_t out_features, scalar_t* output,
            int64_t output_stride) {
    const int64_t block = column_block(groups, out_features);
    const int64_t num_blocks = (out_features + block - 1) / block;
    at::parallel_for(0, groups.count * num_blocks, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> sums;
        for (int64_t task = begin; task < end; ++task) {
            const int64_t group = task / num_blocks, slot = groups.slots[group], rank = groups.rank_of[slot];
            const int64_t first_token = groups.starts[group], num_tokens = groups.starts[group + 1] - first_token;
            const int64_t first = task % num_blocks * block, last = std::min(first + block, out_features);
            if (rank == 0) continue;
            sums.assign(num_tokens * block, 0.0f);
            for (int64_t component = 0; component < rank; component += kUnroll) {
                const int64_t count = std::min<int64_t>(kUnroll, rank - component);
                for (int64_t column = first, slice = 0; column < last; ++slice) {
                    const int64_t slice_last = std::min<int64_t>(slice_ends[slice], last);
                    if (slice_last <= column) continue;
                    const weight_t* b_rows[kUnroll];
                    for (int64_t row = 0; row < count; ++row)
                        b_rows[row] = lora_b + groups.page(slot, component + row) * page_stride + column;
                    for (int64_t token = 0; token < num_tokens; ++token)
                        add_rows(sums.data() + token * block + (column - first), b_rows,
                                 shrunk + ((first_token + token) * num_slices + slice) * groups.max_rank + component,
                                 count, slice_last - column);
                    column = slice_last;
                }
            }
            for (int64_t token = 0; token < num_tokens; ++token) {
                scalar_t* output_row = output + groups.rows[first_token + token] * output_stride;
                for (int64_t column = first; column < last; ++column)
                    output_row[column] = static_cast<float>(output_row[column])
                                         + sums[token * block + column - first];
            }
        }
    });
}

template <typename scalar_t, typename weight_t>
void run(const Groups& groups, const torch::Tensor& x, const torch::Tensor& lora_a, const torch::Tensor& lora_b,
         const torch::Tensor& slice_ends, torch::Tensor& output, float* shrunk) {
    const int64_t num_slices = lora_a.size(1);
    shrink(groups, x.data_ptr<scalar_t>(), lora_a.data_ptr<weight_t>(), lora_a.stride(0), num_slices, lora_a.size(2),
           shrunk);
    expand(groups, shrunk, lora_b.data_ptr<weight_t>(), lora_b.stride(0), slice_ends.data_ptr<int32_t>(), num_slices,
           lora_b.size(1), output.data_ptr<scalar_t>(), output.stride(0));
}

}  // namespace

// output[rows] += x[rows] A_slot^T B_slot, slice by slice, for every group of tokens sorted by slot.
void add_lora_groups(torch::Tensor output, torch::Tensor x, torch::Tensor lora_a, torch::Tensor lora_b,
                     torch::Tensor slot_pages, torch::Tensor ranks, torch::Tensor slice_ends,
                     torch::Tensor sorted_rows, torch::Tensor group_starts, torch::Tensor group_slots,
                     int64_t max_rank) {
    const auto weight_type = lora_a.scalar_type();
    TORCH_CHECK(x.scalar_type() == output.scalar_type() && lora_b.scalar_type() == weight_type,
                "inputs and output in one dtype, both weights in one dtype");
    TORCH_CHECK(weight_type == output.scalar_type()
                || (output.scalar_type() == torch::kFloat
                    && (weight_type == torch::kBFloat16 || weight_type == torch::kHalf)),
                "weights in the inputs' dtype, or in 16 bits under float32 inputs");
    TORCH_CHECK(x.is_contiguous() && slot_pages.is_contiguous() && output.stride(1) == 1 && lora_b.stride(1) == 1
                && lora_a.stride(2) == 1 && lora_a.stride(1) == lora_a.size(2), "contiguous rows");
    TORCH_CHECK(ranks.scalar_type() == torch::kInt && slice_ends.scalar_type() == torch::kInt
                && sorted_rows.scalar_type() == torch::kLong && group_starts.scalar_type() == torch::kInt
                && group_slots.scalar_type() == torch::kInt && slot_pages.scalar_type() == torch::kLong,
                "int32 ranks, slice ends, starts and slots; int64 rows and pages");
    const Groups groups{slot_pages.data_ptr<int64_t>(), slot_pages.size(1), ranks.data_ptr<int32_t>(),
                        sorted_rows.data_ptr<int64_t>(), group_starts.data_ptr<int32_t>(),
                        group_slots.data_ptr<int32_t>(), group_slots.size(0), max_rank};
    std::vector<float> shrunk(sorted_rows.size(0) * lora_a.size(1) * max_rank);
    if (weight_type == output.scalar_type()) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight_type, "add_lora_groups", [&] {
            run<scalar_t, scalar_t>(groups, x, lora_a, lora_b, slice_ends, output, shrunk.data());
        });
    } else {
        AT_DISPATCH_REDUCED_FLOATING_TYPES(weight_type, "add_lora_groups", [&] {
            run<float, scalar_t>(groups, x, lora_a, lora_b, slice_ends, output, shrunk.data());
        });
    }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
    module.def("add_lora_groups", &add_lora_groups, "Grouped LoRA shrink and expand through a page table",
               pybind11::call_guard<pybind11::gil_scoped_release>());
}
