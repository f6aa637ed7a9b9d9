"""Output tokens/s of the HTTP server against transformers' batched `generate`, on the embedded model.

Usage: python -m benchmarks.serve_throughput [--requests 16] [--max-tokens 128] [--out benchmarks/out]
Prints a table, writes serve_throughput.json and serve_throughput.png under --out.
"""
import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

TOPICS = ["the ocean", "volcanoes", "a lighthouse keeper", "bread baking", "the moon landing", "honeybees",
          "chess openings", "a rainy city", "mountain trains", "the printing press", "coral reefs", "jazz",
          "desert plants", "glaciers", "a night market", "old maps", "paper airplanes", "owls", "tea", "comets"]


def make_prompts(count: int) -> list[str]:
    """Prompts of varied length, so requests finish prefill at different times."""
    return [f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}." + " Make it vivid." * (i % 5)
            for i in range(count)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, *flags: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "loraserve.cli", "serve", "--port", str(port), "--model", "embedded", *flags]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=None, text=True)
    for line in process.stdout:
        print("  server:", line.rstrip(), file=sys.stderr)
        if "loraserve ready" in line:
            return process
    raise RuntimeError("the server exited before it was ready")


async def run_server_load(port: int, prompts: list[str], max_tokens: int,
                          models: list[str | None] | None = None) -> tuple[int, float]:
    """All prompts at once, as concurrent HTTP requests (prompt i with models[i], if given, else the base model);
    returns (output tokens, seconds)."""
    models = models or [None] * len(prompts)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
        async def one(prompt: str, model: str | None) -> int:
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            reply = await client.post("/v1/completions", json=body)
            reply.raise_for_status()
            return reply.json()["usage"]["completion_tokens"]

        await one(prompts[0], models[0])  # warm-up
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(prompt, model) for prompt, model in zip(prompts, models)))
        return sum(counts), time.perf_counter() - start


def run_transformers(prompts: list[str], max_tokens: int) -> tuple[int, float]:
    """transformers' own GGUF loading and batched greedy generate, left-padded; returns (tokens, seconds)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraserve.model.embedded import embedded_gguf_path

    path = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, padding_side="left")
    if tokenizer.pad_token is None:  # some transformers versions read none from the GGUF file
        tokenizer.pad_token = tokenizer.eos_token
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the server ran, at its default dtype
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).to(device).eval()
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    settings = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode():
        model.generate(**tokenizer(prompts[:1], return_tensors="pt").to(device), max_new_tokens=4, do_sample=False)
        start = time.perf_counter()
        output = model.generate(**batch, **settings)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return (output.shape[1] - batch["input_ids"].shape[1]) * len(prompts), seconds


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["systems"])
    values = [results["systems"][name]["tokens_per_second"] for name in names]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.bar(names, values, color=["#3b7dd8", "#999999"])
    axis.set_ylabel("output tokens/s")
    axis.set_title(f"{results['requests']} requests x {results['max_tokens']} tokens, embedded model, "
                   f"{results['device']}")
    for index, value in enumerate(values):
        axis.text(index, value, f"{value:.1f}", ha="center", va="bottom")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    prompts = make_prompts(args.requests)

    print("[1/2] loraserve over HTTP: starting the server...", file=sys.stderr)
    port = free_port()
    server = start_server(port)
    try:
        server_tokens, server_seconds = asyncio.run(run_server_load(port, prompts, args.max_tokens))
    finally:
        server.terminate()
        server.wait(timeout=30)
    print("[2/2] transformers generate (batched, no server)...", file=sys.stderr)
    reference_tokens, reference_seconds = run_transformers(prompts, args.max_tokens)

    systems = {
        "loraserve (HTTP)": {"tokens": server_tokens, "seconds": server_seconds},
        "transformers generate": {"tokens": reference_tokens, "seconds": reference_seconds},
    }
    for entry in systems.values():
        entry["tokens_per_second"] = entry["tokens"] / entry["seconds"]
    ratio = systems["loraserve (HTTP)"]["tokens_per_second"] / systems["transformers generate"]["tokens_per_second"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    results = {"requests": args.requests, "max_tokens": args.max_tokens, "device": device,
               "threads": torch.get_num_threads(),
               "cpu_count": os.cpu_count(), "systems": systems, "ratio": ratio}
    print(f"\n{'system':<24}{'tokens':>8}{'seconds':>10}{'tokens/s':>10}")
    for name, entry in systems.items():
        print(f"{name:<24}{entry['tokens']:>8}{entry['seconds']:>10.2f}{entry['tokens_per_second']:>10.1f}")
    print(f"ratio loraserve / transformers: {ratio:.2f}x")
    (args.out / "serve_throughput.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "serve_throughput.png")


if __name__ == "__main__":
    main()
