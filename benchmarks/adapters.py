"""Output tokens/s of the HTTP server on the embedded model with 0 (base), 1, 8 and 32 distinct LoRA adapters.

Usage: python -m benchmarks.adapters [--requests 32] [--max-tokens 64] [--rank 16] [--out benchmarks/out]
Every run sends the same concurrent requests, request i using adapter i mod N. Then times a new adapter from the
start of its upload to its first streamed token. Adapters are random rank-r LoRAs
on all seven projections, written as safetensors directly. Prints a table, writes adapters.json and adapters.png
under --out.
"""
import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save_file

from adapters.format import TARGETS, BaseModelShape
from benchmarks.serve_throughput import free_port, make_prompts, run_server_load, start_server
from server.api.auth import admin_key_from_environment

ADAPTER_COUNTS = (0, 1, 8, 32)
# SmolLM2-135M, the embedded model: 30 layers, hidden 576, MLP 1536, 9 query heads and 3 KV heads of 64.
EMBEDDED_SHAPE = BaseModelShape.for_llama(num_layers=30, hidden_size=576, intermediate_size=1536, num_heads=9,
                                          num_kv_heads=3, head_dim=64)


def write_random_adapter(directory: Path, rank: int, seed: int) -> Path:
    """A PEFT-format LoRA on every projection of every layer, A and B random and small, in float16."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(EMBEDDED_SHAPE.num_layers):
        for target, parent in TARGETS.items():
            in_features, out_features = EMBEDDED_SHAPE.module_shapes[target]
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = random_matrix(rank, in_features, generator)
            tensors[f"{prefix}.lora_B.weight"] = random_matrix(out_features, rank, generator)
    directory.mkdir(parents=True)
    save_file(tensors, directory / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(TARGETS), "bias": "none",
              "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def random_matrix(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    return (torch.randn(rows, columns, generator=generator) * 0.02).to(torch.float16)


def upload_adapter(port: int, directory: Path, name: str) -> None:
    key = admin_key_from_environment()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    files = {file: (file, (directory / file).read_bytes()) for file in ("adapter_config.json",
                                                                        "adapter_model.safetensors")}
    response = httpx.post(f"http://127.0.0.1:{port}/v1/adapters", data={"name": name}, files=files,
                          headers=headers, timeout=120)
    response.raise_for_status()


def upload_adapters(port: int, count: int, rank: int, scratch: Path) -> list[str]:
    """Write and upload `count` adapters; returns their names."""
    names = []
    for index in range(count):
        print(f"  uploading adapter {index + 1}/{count}", file=sys.stderr)
        upload_adapter(port, write_random_adapter(scratch / f"bench-{index}", rank, seed=index), f"bench-{index}")
        names.append(f"bench-{index}")
    return names


def upload_to_first_token(port: int, rank: int, scratch: Path, prompt: str) -> float:
    """Seconds from the start of a new adapter's upload to the first streamed token of a request using it."""
    directory = write_random_adapter(scratch / "fresh", rank, seed=10_000)
    start = time.perf_counter()
    upload_adapter(port, directory, "fresh")
    body = {"model": "fresh", "prompt": prompt, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                return time.perf_counter() - start
    raise RuntimeError("the stream ended without a token")


def measure(port: int, prompts: list[str], max_tokens: int, names: list[str]) -> list[dict]:
    """One timed load per adapter count; request i uses adapter i mod N (the base model when N is 0)."""
    results = []
    for step, count in enumerate(ADAPTER_COUNTS, start=1):
        print(f"[{step}/{len(ADAPTER_COUNTS)}] {count} adapters: {len(prompts)} requests x {max_tokens} tokens...",
              file=sys.stderr)
        models = [names[index % count] if count else None for index in range(len(prompts))]
        tokens, seconds = asyncio.run(run_server_load(port, prompts, max_tokens, models))
        results.append({"adapters": count, "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds})
    for entry in results:
        entry["ratio_to_base"] = entry["tokens_per_second"] / results[0]["tokens_per_second"]
    return results


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(entry["adapters"]) for entry in summary["results"]]
    values = [entry["tokens_per_second"] for entry in summary["results"]]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.bar(labels, values, color=["#999999"] + ["#3b7dd8"] * (len(values) - 1))
    axis.set_xlabel("distinct adapters in the batch (0 = base model)")
    axis.set_ylabel("output tokens/s")
    axis.set_ylim(0, max(values) * 1.15)  # room for the labels
    axis.set_title(f"{summary['requests']} requests x {summary['max_tokens']} tokens, rank {summary['rank']}, "
                   f"embedded model, {summary['device']}")
    for index, entry in enumerate(summary["results"]):
        label = f"{entry['tokens_per_second']:.0f} ({entry['ratio_to_base']:.2f}x)"
        axis.text(index, entry["tokens_per_second"], label, ha="center", va="bottom")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    most = max(ADAPTER_COUNTS)
    with tempfile.TemporaryDirectory(prefix="loraserve-bench-") as scratch:
        print("starting the server...", file=sys.stderr)
        port = free_port()
        server = start_server(port, "--device", args.device, "--max-loras", str(most), "--max-cpu-loras", str(most),
                              "--max-lora-rank", str(args.rank), "--adapter-dir", f"{scratch}/store")
        try:
            names = upload_adapters(port, most, args.rank, Path(scratch))
            results = measure(port, make_prompts(args.requests), args.max_tokens, names)
            print("upload of a new adapter, then its first token...", file=sys.stderr)
            first_token = upload_to_first_token(port, args.rank, Path(scratch), make_prompts(1)[0])
        finally:
            server.terminate()
            server.wait(timeout=30)
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    summary = {"requests": args.requests, "max_tokens": args.max_tokens, "rank": args.rank, "device": device,
               "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "results": results,
               "upload_to_first_token_seconds": first_token}
    print(f"\n{'adapters':>8}{'tokens':>8}{'seconds':>10}{'tokens/s':>10}{'vs base':>9}")
    for entry in results:
        print(f"{entry['adapters']:>8}{entry['tokens']:>8}{entry['seconds']:>10.2f}{entry['tokens_per_second']:>10.1f}"
              f"{entry['ratio_to_base']:>8.2f}x")
    print(f"upload of a new adapter to its first token: {first_token:.2f} s")
    (args.out / "adapters.json").write_text(json.dumps(summary, indent=2))
    plot(summary, args.out / "adapters.png")


if __name__ == "__main__":
    main()
