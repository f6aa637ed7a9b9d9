"""Output tokens/s and latency of the HTTP server on the embedded model with many LoRA adapters, each row against
its memory-traffic bound.

Usage: python -m benchmarks.adapters [--requests 64] [--max-tokens 32] [--counts 0,8,32,128,1000] [--out DIR]
Adapters are random LoRAs of rank 8, 16, 32 or 64 on q/v, on the attention projections or on all seven (cycling),
written into the server's adapter directory before it starts; names share a dozen files through hard links, so a
thousand adapters cost the disk little, while the server loads each as its own. A row sends --requests concurrent
requests, request i using an adapter drawn uniformly, or by Zipf(1.0), from the N adapters (0: the base model),
and reports output tokens/s, p50 and p99 latency, and the fraction of its bound min(base, base * B / (B + A)):
B the bytes of base weights a step reads as served (int4 codes and scales by default), A the bytes of the distinct
adapters the row uses in the server's pool (bfloat16 under a quantized base on the CPU), each read every step.
Then times a new adapter from the start of its upload to its first streamed token. Prints a table, writes
adapters.json and adapters.png under --out.

Before the rows, one unmeasured pass brings in adapters from the end of the list (so the rows still load theirs
from disk) until their pages fill the adapter pool (--warm-up to choose the count): the pool is set aside
untouched, and on a VM whose host backs guest memory lazily, the first write to never-used memory runs ~20x
slower than later ones (about 100 MB/s on the 2-core dev VM). The rows then measure a server that has been up a
while, whose new adapters take pages other adapters have used; the pass's own time, the cost of a first fill,
is reported beside them.
"""
import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save_file

from benchmarks.embedded import weight_bytes_per_step
from benchmarks.serve_throughput import free_port, make_prompts, start_server
from loraserve.adapters.adapter_info import BaseModelShape
from loraserve.adapters.lora_config import TARGETS
from loraserve.api.auth import admin_key_from_environment
from loraserve.config import ServerConfig
from loraserve.engine.async_engine import resolve_device
from loraserve.engine.setup import adapter_dtype, adapter_pages
from loraserve.model.loader import load_model

RANKS = (8, 16, 32, 64)
TARGET_SETS = (("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"), tuple(TARGETS))
# SmolLM2-135M, the embedded model: 30 layers, hidden 576, MLP 1536, 9 query heads and 3 KV heads of 64.
EMBEDDED_SHAPE = BaseModelShape.for_llama(num_layers=30, hidden_size=576, intermediate_size=1536, num_heads=9,
                                          num_kv_heads=3, head_dim=64, vocab_size=49152)


def kind(index: int) -> tuple[int, tuple[str, ...]]:
    """Adapter i's rank and targets: every combination comes up, ranks and target sets cycling independently."""
    return RANKS[index % len(RANKS)], TARGET_SETS[index // len(RANKS) % len(TARGET_SETS)]


def adapter_bytes(rank: int, targets: tuple[str, ...], element_bytes: int) -> int:
    """The weights the server reads for the adapter in every step that uses it."""
    per_layer = sum(sum(EMBEDDED_SHAPE.module_shapes[target]) for target in targets)
    return rank * per_layer * EMBEDDED_SHAPE.num_layers * element_bytes


def served_bytes(device: str) -> tuple[int, torch.dtype]:
    """What the server reads per step, from the embedded model loaded as the server loads it: the base weights'
    bytes, and the dtype of the adapters in the server's pool."""
    loaded = load_model("embedded", resolve_device(device), None, "auto")
    return weight_bytes_per_step(loaded.model), adapter_dtype(loaded.model)


def adapters_filling_the_pool(pool_dtype: torch.dtype, num_names: int) -> int:
    """How many adapters, from the end of the list, take as many pages as the server's default pool holds."""
    pool_pages, taken = adapter_pages(ServerConfig(), EMBEDDED_SHAPE, pool_dtype), 0
    for count, index in enumerate(reversed(range(num_names)), start=1):
        taken += kind(index)[0]  # an adapter of rank r takes r pages
        if taken >= pool_pages:
            return count
    return num_names


def write_random_adapter(directory: Path, rank: int, seed: int, targets: tuple[str, ...] = tuple(TARGETS)) -> Path:
    """A PEFT-format LoRA, A and B random and small, in float16."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(EMBEDDED_SHAPE.num_layers):
        for target in targets:
            in_features, out_features = EMBEDDED_SHAPE.module_shapes[target]
            prefix = f"base_model.model.model.layers.{layer}.{TARGETS[target]}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = random_matrix(rank, in_features, generator)
            tensors[f"{prefix}.lora_B.weight"] = random_matrix(out_features, rank, generator)
    directory.mkdir(parents=True)
    save_file(tensors, directory / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(targets), "bias": "none",
              "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def random_matrix(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    return (torch.randn(rows, columns, generator=generator) * 0.02).to(torch.float16)


def place_adapters(store: Path, scratch: Path, count: int) -> list[str]:
    """`count` adapters in the store's layout (<name>/v1/...), hard links to one source file per kind."""
    sources: dict[int, Path] = {}
    names = []
    for index in range(count):
        key = index % (len(RANKS) * len(TARGET_SETS))
        if key not in sources:
            rank, targets = kind(index)
            sources[key] = write_random_adapter(scratch / f"kind-{key}", rank, seed=key, targets=targets)
        version = store / f"bench-{index}" / "v1"
        version.mkdir(parents=True)
        for file in sources[key].iterdir():
            os.link(file, version / file.name)
        names.append(f"bench-{index}")
    return names


def choose_adapters(names: list[str], count: int, requests: int, zipf: bool, seed: int = 0) -> list[str | None]:
    """The adapter of each request: uniform, or Zipf(1.0) by rank of popularity, over the first `count` names."""
    if count == 0:
        return [None] * requests
    weights = [1.0 / (rank + 1) for rank in range(count)] if zipf else [1.0] * count
    return random.Random(seed).choices(names[:count], weights=weights, k=requests)


async def run_load(port: int, prompts: list[str], max_tokens: int, models: list[str | None]
                   ) -> tuple[int, float, list[float]]:
    """All prompts at once, prompt i with models[i]; returns output tokens, seconds, and each request's latency."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=3600) as client:
        async def one(prompt: str, model: str | None) -> tuple[int, float]:
            start = time.perf_counter()
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            reply = await client.post("/v1/completions", json=body)
            reply.raise_for_status()
            return reply.json()["usage"]["completion_tokens"], time.perf_counter() - start

        await one(prompts[0], None)  # warm-up
        start = time.perf_counter()
        results = await asyncio.gather(*(one(prompt, model) for prompt, model in zip(prompts, models)))
        return sum(tokens for tokens, _ in results), time.perf_counter() - start, [latency for _, latency in results]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def warm_up(port: int, names: list[str], count: int) -> float:
    """Seconds to serve one token for each of the last `count` adapters, 64 requests at a time."""
    start = time.perf_counter()
    for begin in range(len(names) - count, len(names), 64):
        models = names[begin:begin + 64]
        print(f"warm-up: adapters {begin}-{begin + len(models) - 1}...", file=sys.stderr)
        asyncio.run(run_load(port, make_prompts(len(models)), 1, models))
    return time.perf_counter() - start


def measure(port: int, args: argparse.Namespace, names: list[str]) -> list[dict]:
    prompts = make_prompts(args.requests)
    rows = [(0, False)] + [(count, zipf) for count in args.counts if count for zipf in (False, True)]
    results = []
    for step, (count, zipf) in enumerate(rows, start=1):
        models = choose_adapters(names, count, args.requests, zipf)
        print(f"[{step}/{len(rows)}] {count} adapters {'zipf' if zipf else 'uniform'}: {args.requests} requests x "
              f"{args.max_tokens} tokens...", file=sys.stderr)
        tokens, seconds, latencies = asyncio.run(run_load(port, prompts, args.max_tokens, models))
        distinct = sorted({name for name in models if name is not None})
        read = sum(adapter_bytes(*kind(int(name.removeprefix("bench-"))), args.adapter_element_bytes)
                   for name in distinct)
        results.append({"adapters": count, "distribution": "zipf" if zipf else "uniform", "distinct": len(distinct),
                        "adapter_bytes": read, "tokens": tokens, "seconds": seconds,
                        "tokens_per_second": tokens / seconds, "p50_seconds": statistics.median(latencies),
                        "p99_seconds": percentile(latencies, 0.99)})
    base = results[0]
    for entry in results:
        share = args.base_bytes / (args.base_bytes + entry["adapter_bytes"])
        entry["bound_tokens_per_second"] = base["tokens_per_second"] * share
        entry["fraction_of_bound"] = entry["tokens_per_second"] / entry["bound_tokens_per_second"]
        entry["p99_vs_base"] = entry["p99_seconds"] / base["p99_seconds"]
    return results


def upload_to_first_token(port: int, scratch: Path, prompt: str) -> float:
    """Seconds from the start of a new adapter's upload to the first streamed token of a request using it."""
    directory = write_random_adapter(scratch / "fresh", 16, seed=10_000)
    key = admin_key_from_environment()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    files = {file: (file, (directory / file).read_bytes()) for file in ("adapter_config.json",
                                                                        "adapter_model.safetensors")}
    start = time.perf_counter()
    httpx.post(f"http://127.0.0.1:{port}/v1/adapters", data={"name": "fresh"}, files=files, headers=headers,
               timeout=120).raise_for_status()
    body = {"model": "fresh", "prompt": prompt, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                return time.perf_counter() - start
    raise RuntimeError("the stream ended without a token")


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = summary["results"]
    labels = [f"{entry['adapters']}\n{entry['distribution']}" if entry["adapters"] else "base" for entry in results]
    figure, axis = plt.subplots(figsize=(9, 4))
    axis.bar(labels, [entry["tokens_per_second"] for entry in results], color="#3b7dd8", label="measured")
    axis.plot(labels, [entry["bound_tokens_per_second"] for entry in results], "k_", markersize=24,
              label="memory-traffic bound")
    for index, entry in enumerate(results):
        axis.text(index, entry["tokens_per_second"], f"{entry['fraction_of_bound']:.2f}", ha="center", va="bottom")
    axis.set_ylabel("output tokens/s")
    axis.set_title(f"{summary['requests']} concurrent requests x {summary['max_tokens']} tokens, adapters of rank "
                   f"8-64, embedded model, {summary['device']}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--counts", type=lambda text: [int(part) for part in text.split(",")],
                        default=[8, 32, 128, 1000])
    parser.add_argument("--warm-up", type=int, default=None,
                        help="adapters brought in once before the rows (default: as many as fill the pool)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.base_bytes, pool_dtype = served_bytes(args.device)
    args.adapter_element_bytes = pool_dtype.itemsize
    print(f"served: {args.base_bytes / 1e6:.1f} MB of base weights a step, adapters in "
          f"{args.adapter_element_bytes}-byte elements", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="loraserve-bench-") as scratch:
        print(f"writing {max(args.counts)} adapters...", file=sys.stderr)
        names = place_adapters(Path(scratch) / "store", Path(scratch), max(args.counts))
        if args.warm_up is None:
            args.warm_up = adapters_filling_the_pool(pool_dtype, len(names))
        print("starting the server...", file=sys.stderr)
        port = free_port()
        server = start_server(port, "--device", args.device, "--adapter-dir", f"{scratch}/store")
        try:
            warm_up_seconds = warm_up(port, names, min(args.warm_up, len(names)))
            results = measure(port, args, names)
            print("upload of a new adapter, then its first token...", file=sys.stderr)
            first_token = upload_to_first_token(port, Path(scratch), make_prompts(1)[0])
        finally:
            server.terminate()
            server.wait(timeout=30)
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    summary = {"requests": args.requests, "max_tokens": args.max_tokens, "device": device,
               "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "results": results,
               "base_bytes": args.base_bytes, "adapter_element_bytes": args.adapter_element_bytes,
               "upload_to_first_token_seconds": first_token, "warm_up_adapters": min(args.warm_up, len(names)),
               "warm_up_seconds": warm_up_seconds}
    print(f"\n{'adapters':>8} {'spread':>8}{'distinct':>9}{'tokens/s':>10}{'bound':>8}{'of bound':>9}"
          f"{'p50 s':>8}{'p99 s':>8}{'p99/base':>9}")
    for entry in results:
        print(f"{entry['adapters']:>8} {entry['distribution']:>8}{entry['distinct']:>9}"
              f"{entry['tokens_per_second']:>10.1f}{entry['bound_tokens_per_second']:>8.1f}"
              f"{entry['fraction_of_bound']:>9.2f}{entry['p50_seconds']:>8.1f}{entry['p99_seconds']:>8.1f}"
              f"{entry['p99_vs_base']:>9.2f}")
    print(f"upload of a new adapter to its first token: {first_token:.2f} s")
    print(f"warm-up, {summary['warm_up_adapters']} adapters brought in once (a first fill of the pool's memory): "
          f"{warm_up_seconds:.1f} s")
    (args.out / "adapters.json").write_text(json.dumps(summary, indent=2))
    plot(summary, args.out / "adapters.png")


if __name__ == "__main__":
    main()
