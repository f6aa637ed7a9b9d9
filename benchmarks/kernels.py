"""GPU timings of our Triton kernels against their ceilings, and of the model's decode step (CUDA only).

The ceilings: flash SDPA for prefill attention, device copy bandwidth for decode attention, the base projection's
F.linear for LoRA.

Usage: python -m benchmarks.kernels [--out benchmarks/out] [--quick]
Prints a table, writes kernels.json and kernels.png under --out. Times are `triton.testing.do_bench` medians
(it warms up and clears L2 between runs, so repeated runs over one input do not measure the cache).
"""
import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from loraserve.kernels.attention import AttentionMetadata, paged_attention
from loraserve.kernels.lora import LoraMapping, LoraWeights, add_lora, add_lora_reference
from loraserve.engine.cuda_graphs import DecodeGraphs
from loraserve.model.config import ModelConfig
from loraserve.model.llama import LlamaModel

DTYPE = torch.bfloat16
BLOCK_SIZE = 16  # the server's default KV block size
# (name, query heads, KV heads, head dim): SmolLM2-135M, and a Llama-3-8B-like shape.
ATTENTION_SHAPES = [("smollm2 9/3x64", 9, 3, 64), ("llama 32/8x128", 32, 8, 128)]
# (name, in features, slice sizes): the fused q/k/v and gate/up projections.
LORA_SHAPES = [("smollm2 qkv", 576, [576, 192, 192]), ("smollm2 gate_up", 576, [1536, 1536]),
               ("4096 qkv", 4096, [4096, 1024, 1024]), ("4096 gate_up", 4096, [14336, 14336])]
TARGETS = {"prefill_ratio": 1.25, "decode_bandwidth_fraction": 0.70, "lora_fraction": 0.20}


def bench_ms(fn) -> float:
    fn()  # compile and autotune outside the timed region
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=100, rep=500, return_mode="median")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB: bytes read plus bytes written per second."""
    source = torch.randn(1 << 29, dtype=DTYPE, device="cuda")
    target = torch.empty_like(source)
    ms = bench_ms(lambda: target.copy_(source))
    return 2 * source.nbytes / (ms * 1e-3)


def paged_inputs(num_seqs: int, context: int, kv_heads: int, head_dim: int):
    """Contiguous K/V [seqs, context, kv_heads, dim] and the same data in a paged cache with shuffled blocks."""
    keys, values = (torch.randn(num_seqs, context, kv_heads, head_dim, dtype=DTYPE, device="cuda") for _ in "kv")
    blocks_per_seq = context // BLOCK_SIZE
    block_tables = torch.randperm(num_seqs * blocks_per_seq, device="cuda").view(num_seqs, -1).int()
    caches = []
    for contiguous in (keys, values):
        cache = torch.empty(num_seqs * blocks_per_seq, BLOCK_SIZE, kv_heads, head_dim, dtype=DTYPE, device="cuda")
        cache[block_tables.flatten().long()] = contiguous.view(-1, BLOCK_SIZE, kv_heads, head_dim)
        caches.append(cache)
    return keys, values, caches[0], caches[1], block_tables


def metadata_for(block_tables: torch.Tensor, query_len: int, context: int):
    num_seqs = block_tables.shape[0]
    return AttentionMetadata(
        slot_mapping=torch.zeros(num_seqs * query_len, dtype=torch.int64, device="cuda"),  # unused by attention
        block_tables=block_tables,
        query_start_loc=(torch.arange(num_seqs + 1, device="cuda") * query_len).int(),
        seq_lens=torch.full((num_seqs,), context, dtype=torch.int32, device="cuda"),
        max_query_len=query_len, max_seq_len=context)


def flash_sdpa(query, keys, values, gqa: bool) -> torch.Tensor:
    """query [seqs, heads, n, d], keys/values [seqs, kv_heads or heads, n, d]; causal, flash backend only."""
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(query, keys, values, is_causal=True, enable_gqa=gqa)


def flash_inputs(query, keys, values) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """K/V as the flash backend takes them: grouped if it accepts GQA, else expanded to every query head (the
    expansion is then outside the timed call). Returns keys, values and whether they were expanded."""
    try:
        flash_sdpa(query, keys, values, gqa=True)
        return keys, values, False
    except RuntimeError:
        group = query.shape[1] // keys.shape[1]
        return keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1), True


def bench_prefill(name: str, heads: int, kv_heads: int, head_dim: int, num_seqs: int, context: int) -> dict:
    keys, values, key_cache, value_cache, tables = paged_inputs(num_seqs, context, kv_heads, head_dim)
    query = torch.randn(num_seqs * context, heads, head_dim, dtype=DTYPE, device="cuda")
    metadata, scale = metadata_for(tables, context, context), head_dim ** -0.5
    ours = paged_attention(query, key_cache, value_cache, metadata, scale)
    query4, keys4, values4 = (t.view(num_seqs, context, -1, head_dim).transpose(1, 2) for t in (query, keys, values))
    keys4, values4, expanded = flash_inputs(query4, keys4, values4)
    flash = flash_sdpa(query4, keys4, values4, gqa=not expanded)
    error = relative_error(ours, flash.transpose(1, 2).reshape_as(query))
    ours_ms = bench_ms(lambda: paged_attention(query, key_cache, value_cache, metadata, scale))
    flash_ms = bench_ms(lambda: flash_sdpa(query4, keys4, values4, gqa=not expanded))
    flops = 4 * num_seqs * heads * head_dim * context * context / 2  # causal: half the score matrix
    return {"shape": name, "seqs": num_seqs, "context": context, "ours_ms": ours_ms, "flash_ms": flash_ms,
            "ratio": ours_ms / flash_ms, "ours_tflops": flops / ours_ms * 1e-9, "flash_tflops": flops / flash_ms * 1e-9,
            "flash_gqa_expanded": expanded, "relative_error": error}


def bench_decode(name: str, heads: int, kv_heads: int, head_dim: int, num_seqs: int, context: int,
                 copy_bytes_per_s: float) -> dict:
    keys, values, key_cache, value_cache, tables = paged_inputs(num_seqs, context, kv_heads, head_dim)
    query = torch.randn(num_seqs, heads, head_dim, dtype=DTYPE, device="cuda")
    metadata, scale = metadata_for(tables, 1, context), head_dim ** -0.5
    ours = paged_attention(query, key_cache, value_cache, metadata, scale)
    reference = F.scaled_dot_product_attention(  # one query sees its whole context: no mask
        query[:, :, None], keys.transpose(1, 2), values.transpose(1, 2), scale=scale, enable_gqa=True)
    error = relative_error(ours, reference[:, :, 0])
    ms = bench_ms(lambda: paged_attention(query, key_cache, value_cache, metadata, scale))
    moved = keys.nbytes + values.nbytes + 2 * query.nbytes + tables.nbytes
    bandwidth = moved / (ms * 1e-3)
    return {"shape": name, "seqs": num_seqs, "context": context, "ms": ms, "bytes": moved,
            "gb_per_s": bandwidth * 1e-9, "fraction_of_copy": bandwidth / copy_bytes_per_s, "relative_error": error}


def bench_lora(name: str, in_features: int, slice_sizes: list[int], tokens: int, adapters: int, rank: int) -> dict:
    out_features = sum(slice_sizes)
    x = torch.randn(tokens, in_features, dtype=DTYPE, device="cuda")
    base = torch.randn(out_features, in_features, dtype=DTYPE, device="cuda") * in_features ** -0.5
    # Scaled so the delta is as large as the base output: its rounding error is then visible on its own. Adapter
    # i's rank components sit in pages 1 + i * rank onward; page 0 is the pool's zero page.
    pages = adapters * rank + 1
    lora_a = torch.randn(pages, len(slice_sizes), in_features, dtype=DTYPE, device="cuda") * in_features ** -0.5
    lora_b = torch.randn(pages, out_features, dtype=DTYPE, device="cuda") * rank ** -0.5
    lora_a[0], lora_b[0] = 0, 0
    slot_pages = torch.arange(1, pages, device="cuda").view(adapters, rank)
    weights = LoraWeights(lora_a, lora_b, slot_pages, slice_sizes, [rank] * adapters)
    mapping = LoraMapping.from_token_slots(torch.randint(0, adapters, (tokens,)).tolist(), torch.device("cuda"))
    base_output = F.linear(x, base)
    output, expected = base_output.clone(), torch.zeros(tokens, out_features, device="cuda")
    add_lora(output, x, weights, mapping)
    add_lora_reference(expected, x.float(), _float_weights(weights), mapping)
    error = relative_error(output.float() - base_output.float(), expected)
    linear_ms = bench_ms(lambda: F.linear(x, base))
    lora_ms = bench_ms(lambda: add_lora(output, x, weights, mapping))
    return {"shape": name, "tokens": tokens, "adapters": adapters, "rank": rank, "linear_ms": linear_ms,
            "lora_ms": lora_ms, "fraction": lora_ms / linear_ms, "relative_error": error}


def _float_weights(weights: LoraWeights) -> LoraWeights:
    return LoraWeights(weights.lora_a.float(), weights.lora_b.float(), weights.slot_pages, weights.slice_sizes,
                       weights.ranks)


def smollm2_config() -> ModelConfig:
    return ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                       rope_theta=100000.0, rope_scaling=None, max_position_embeddings=8192,
                       tie_word_embeddings=True, bos_token_id=1, eos_token_ids=[2])


def bench_decode_step(batch_sizes: list[int], context: int) -> dict:
    """The model's forward plus logits for one new token per sequence, random SmolLM2-shaped weights: eagerly,
    and replayed through the server's CUDA graphs (`DecodeGraphs`, base-model graphs)."""
    config = smollm2_config()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        with torch.device("cuda"):
            model = LlamaModel(config).eval()
    finally:
        torch.set_default_dtype(previous)
    results = {"eager_ms": {}, "graph_ms": {}, "graph_max_abs_difference": {}}
    for batch in batch_sizes:
        caches = [paged_inputs(batch, context, config.num_key_value_heads, config.head_dim)[2:] for _ in model.layers]
        tables = caches[0][2]  # one block table for every layer, as the engine does
        metadata = metadata_for(tables, 1, context)
        metadata.slot_mapping = tables[:, -1].long() * BLOCK_SIZE + BLOCK_SIZE - 1  # the last slot is the new token
        input_ids = torch.randint(0, config.vocab_size, (batch,), device="cuda")
        positions = torch.full((batch,), context - 1, device="cuda")
        kv_caches = [(key_cache, value_cache) for key_cache, value_cache, _ in caches]
        with torch.inference_mode():
            graphs = DecodeGraphs(model, kv_caches, [], batch, context, BLOCK_SIZE)
            graphs.capture()

            def eager() -> torch.Tensor:
                return model.compute_logits(model(input_ids, positions, metadata, kv_caches))

            def replayed() -> torch.Tensor:
                return model.compute_logits(graphs.run(input_ids, positions, metadata, [-1] * batch))

            results["eager_ms"][str(batch)] = bench_ms(eager)
            results["graph_ms"][str(batch)] = bench_ms(replayed)
            results["graph_max_abs_difference"][str(batch)] = (eager() - replayed()).abs().max().item()
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("prefill: ours / flash SDPA", [(r["shape"], r["ratio"]) for r in results["prefill"]],
               TARGETS["prefill_ratio"]),
              ("decode: fraction of copy bandwidth", [(r["shape"], r["fraction_of_copy"]) for r in results["decode"]],
               TARGETS["decode_bandwidth_fraction"]),
              ("LoRA: fraction of base F.linear", [(r["shape"], r["fraction"]) for r in results["lora"]],
               TARGETS["lora_fraction"])]
    figure, axes = plt.subplots(1, 3, figsize=(13, 4))
    for axis, (title, bars, target) in zip(axes, panels):
        axis.bar([label for label, _ in bars], [value for _, value in bars], color="#3b7dd8")
        axis.axhline(target, color="#d83b3b", linestyle="--", label=f"target {target}")
        axis.set_title(title, fontsize=10)
        axis.tick_params(axis="x", labelrotation=20, labelsize=8)
        axis.legend(fontsize=8)
    figure.suptitle(f"{results['device']}, {results['date']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def print_table(results: dict) -> None:
    print(f"\n{results['device']}  {results['date']}  copy {results['copy_gb_per_s']:.0f} GB/s")
    print(f"{'benchmark':<34}{'ours ms':>10}{'ref ms':>10}{'result':>10}{'target':>9}{'rel err':>10}")
    for r in results["prefill"]:
        print(f"{'prefill ' + r['shape']:<34}{r['ours_ms']:>10.3f}{r['flash_ms']:>10.3f}{r['ratio']:>9.2f}x"
              f"{'<=1.25x':>9}{r['relative_error']:>10.1e}")
    for r in results["decode"]:
        print(f"{'decode ' + r['shape']:<34}{r['ms']:>10.3f}{'':>10}{r['fraction_of_copy']:>9.0%} "
              f"{'>=70%':>9}{r['relative_error']:>10.1e}")
    for r in results["lora"]:
        print(f"{'lora ' + r['shape']:<34}{r['lora_ms']:>10.3f}{r['linear_ms']:>10.3f}{r['fraction']:>9.0%} "
              f"{'<=20%':>9}{r['relative_error']:>10.1e}")
    step = results["decode_step"]
    for batch, eager_ms in step["eager_ms"].items():
        graph_ms = step["graph_ms"][batch]
        print(f"{'decode step batch ' + batch:<34}{graph_ms:>10.3f}{eager_ms:>10.3f}{eager_ms / graph_ms:>9.2f}x"
              f"{'graphs':>9}{step['graph_max_abs_difference'][batch]:>10.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--quick", action="store_true", help="the SmolLM2 shapes only, smaller contexts")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks.kernels needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured.")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    context = 512 if args.quick else 2048
    attention_shapes = ATTENTION_SHAPES[:1] if args.quick else ATTENTION_SHAPES
    lora_shapes = LORA_SHAPES[:2] if args.quick else LORA_SHAPES
    copy_bytes_per_s = copy_bandwidth()
    results = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": triton.__version__, "dtype": str(DTYPE),
        "block_size": BLOCK_SIZE, "targets": TARGETS, "copy_gb_per_s": copy_bytes_per_s * 1e-9,
        "prefill": [bench_prefill(name, h, kv, d, 8, context) for name, h, kv, d in attention_shapes],
        "decode": [bench_decode(name, h, kv, d, 64, context, copy_bytes_per_s) for name, h, kv, d in attention_shapes],
        "lora": [bench_lora(name, size, slices, 256, 32, 16) for name, size, slices in lora_shapes],
        "decode_step": {"model": "SmolLM2-135M shape, random weights", "context": context,
                        **bench_decode_step([1, 8, 32], context)},
    }
    assert all(math.isfinite(r["relative_error"]) for key in ("prefill", "decode", "lora") for r in results[key])
    print_table(results)
    (args.out / "kernels.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "kernels.png")


if __name__ == "__main__":
    main()
