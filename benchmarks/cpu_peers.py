"""loraserve in each weight format against llama.cpp's server and transformers, on the embedded model, on the CPU.

Every server gets the same prompts from the same streaming client: output tokens/s with one request at a time and
with --concurrency at once, and the median time to first token. Each loraserve format's perplexity, and how often
its top token equals float32's, are computed in process through the engine's prompt scoring (`benchmarks.perplexity`,
in chunks of 8 tokens, as the server's decodes and drafts run) over up to 2,048 tokens of README.md.

llama-server is not installed by pip. Build it from the llama.cpp vendored in llama-cpp-python's source package:
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -B build -G Ninja -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \\
        -DLLAMA_BUILD_SERVER=ON -DCMAKE_BUILD_TYPE=Release && cmake --build build --target llama-server -j2
        && cmake --build build --target llama-quantize -j2
then pass --llama-server build/bin/llama-server (it is skipped, with a message, when missing). Formats other than
the file's own Q4_1 (--llama-formats) are made with the llama-quantize beside it, from the Q4_1 file (so every
format holds the same weights, requantized), and kept under --out.

Usage: python -m benchmarks.cpu_peers [--llama-server PATH] [--llama-formats Q4_1,Q8_0,BF16] [--requests 16]
                                      [--max-tokens 128] [--out DIR]
Prints a table, writes cpu_peers.json and cpu_peers.png under --out.
"""
import argparse
import asyncio
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from benchmarks.perplexity import Window, engine_scores, text_tokens
from benchmarks.serve_throughput import free_port, make_prompts, run_transformers
from loraserve.config import ServerConfig
from loraserve.engine.engine import LLMEngine
from loraserve.model.embedded import embedded_gguf_path
from loraserve.model.loader import load_model

LORASERVE_FORMATS = {"int4 (default)": [], "int8": ["--quantization", "int8"],
                     "bfloat16": ["--dtype", "bfloat16", "--quantization", "none"], "float32": ["--dtype", "float32"]}
# In process: (dtype, quantization) of each format, the float32 reference first.
PERPLEXITY_SETTINGS = {"float32": (torch.float32, "none"), "int4 (default)": (None, "auto"), "int8": (None, "int8"),
                       "bfloat16": (torch.bfloat16, "none")}
PERPLEXITY_TOKENS = 2048


def start(command: list[str], port: int, log: Path) -> subprocess.Popen:
    """Start a server and wait until /health answers 200."""
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[0]} exited early; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"{command[0]} did not become ready; see {log}")


async def stream_one(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple[int, float]:
    """One streamed completion: (output tokens, seconds to the first token)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    start_time, first, chunks, finish = time.perf_counter(), None, 0, None
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice.get("text"):
                chunks += 1
                first = first or time.perf_counter() - start_time
            finish = choice.get("finish_reason") or finish
    return (max_tokens if finish == "length" else chunks), first or math.nan


async def load(port: int, prompts: list[str], max_tokens: int, concurrency: int) -> dict:
    """Prompts in waves of `concurrency`; tokens/s over the whole run and the median time to first token."""
    # A new connection per request: llama-server can close a kept-alive connection just as the next request is
    # sent on it ("Server disconnected without sending a response").
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=1200, limits=limits) as client:
        await stream_one(client, prompts[0], 4)  # warm-up
        start_time, results = time.perf_counter(), []
        for index in range(0, len(prompts), concurrency):
            wave = prompts[index:index + concurrency]
            results += await asyncio.gather(*(stream_one(client, prompt, max_tokens) for prompt in wave))
        seconds = time.perf_counter() - start_time
    tokens = sum(count for count, _ in results)
    return {"tokens_per_second": tokens / seconds, "ttft_median_s": statistics.median(t for _, t in results)}


def measure_server(command: list[str], port: int, log: Path, args: argparse.Namespace) -> dict:
    process = start(command, port, log)
    try:
        return {"1": asyncio.run(load(port, make_prompts(args.sequential), args.max_tokens, 1)),
                str(args.concurrency): asyncio.run(load(port, make_prompts(args.requests), args.max_tokens,
                                                        args.concurrency))}
    finally:
        process.terminate()
        process.wait(timeout=60)


def llama_model_file(llama_server: Path, kind: str, out: Path) -> Path | None:
    """The embedded GGUF file as `kind`: the file itself for Q4_1, else requantized once by llama-quantize."""
    if kind == "Q4_1":
        return embedded_gguf_path()
    target = out / f"SmolLM2-135M-Instruct.{kind}.gguf"
    quantizer = llama_server.resolve().with_name("llama-quantize")
    if not target.exists():
        if not quantizer.exists():
            return None
        subprocess.run([str(quantizer), "--allow-requantize", str(embedded_gguf_path()), str(target), kind],
                       check=True, capture_output=True)
    return target


def perplexities() -> dict[str, tuple[float, float]]:
    """Each loraserve format's perplexity over README.md, and how often its top token agrees with float32's,
    through the engine's prompt scoring in chunks of 8 tokens (as the server's decodes and drafts run)."""
    results, reference = {}, None
    for name, (dtype, quantization) in PERPLEXITY_SETTINGS.items():
        loaded = load_model("embedded", torch.device("cpu"), dtype, quantization)
        tokens = text_tokens(loaded.tokenizer, Path("README.md").read_text())[:PERPLEXITY_TOKENS + 1]
        engine = LLMEngine(loaded, ServerConfig(max_num_batched_tokens=8, max_model_len=len(tokens) + 1))
        scores = engine_scores(engine, [Window(tokens, 1)], None, alternatives=1)
        top = [score.top[0][0] for score in scores]
        reference = top if reference is None else reference
        agreement = sum(ours == theirs for ours, theirs in zip(top, reference)) / len(top)
        results[name] = (math.exp(-sum(score.logprob for score in scores) / len(scores)), agreement)
    return results


def plot(results: dict, concurrency: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["systems"])
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, key in zip(axes, ["1", str(concurrency)]):
        values = [results["systems"][name][key]["tokens_per_second"] for name in names]
        axis.barh(names, values, color="#3b7dd8")
        axis.set_title(f"{key} at a time: output tokens/s")
        for index, value in enumerate(values):
            axis.text(value, index, f" {value:.1f}", va="center")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-server", type=Path, default=Path(os.environ.get("LLAMA_SERVER", "llama-server")))
    parser.add_argument("--llama-formats", default="Q4_1,Q8_0,BF16", help="llama-server's weight formats to run")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sequential", type=int, default=4, help="requests sent one at a time")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    systems = {}
    for step, (name, flags) in enumerate(LORASERVE_FORMATS.items(), 1):
        print(f"[{step}/{len(LORASERVE_FORMATS) + 2}] loraserve {name}...", file=sys.stderr)
        port = free_port()
        command = [sys.executable, "-m", "loraserve.cli", "serve", "--port", str(port), "--model", "embedded", *flags]
        systems[f"loraserve {name}"] = measure_server(command, port, args.out / "loraserve.log", args)
    print(f"[{len(LORASERVE_FORMATS) + 1}/{len(LORASERVE_FORMATS) + 2}] llama-server...", file=sys.stderr)
    llama_server = shutil.which(str(args.llama_server))
    if llama_server is not None:
        for kind in args.llama_formats.split(","):
            model = llama_model_file(Path(llama_server), kind, args.out)
            if model is None:
                print(f"  {kind} skipped: no llama-quantize beside {args.llama_server}", file=sys.stderr)
                continue
            port = free_port()
            command = [llama_server, "-m", str(model), "-t", "2", "-np", str(args.concurrency), "-cb",
                       "--port", str(port), "-c", str(args.concurrency * 512)]
            systems[f"llama-server {kind}"] = measure_server(command, port, args.out / "llama-server.log", args)
    else:
        print(f"  skipped: no llama-server at {args.llama_server} (see this module's docstring)", file=sys.stderr)
    print(f"[{len(LORASERVE_FORMATS) + 2}/{len(LORASERVE_FORMATS) + 2}] transformers generate and perplexities...",
          file=sys.stderr)
    tokens, seconds = run_transformers(make_prompts(args.requests), args.max_tokens)
    systems["transformers generate (batched)"] = {str(args.concurrency): {"tokens_per_second": tokens / seconds,
                                                                          "ttft_median_s": math.nan},
                                                  "1": {"tokens_per_second": math.nan, "ttft_median_s": math.nan}}
    for name, (perplexity, agreement) in perplexities().items():
        systems[f"loraserve {name}"].update(perplexity=perplexity, top1_agreement=agreement)
    results = {"requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
               "cpu_count": os.cpu_count(), "systems": systems}
    key = str(args.concurrency)
    print(f"\n{'system':<34}{'1 at a time':>12}{key + ' at once':>12}{'TTFT (1)':>10}{'perplexity':>12}"
          f"{'top-1 = fp32':>14}")
    for name, entry in systems.items():
        print(f"{name:<34}{entry['1']['tokens_per_second']:>12.1f}{entry[key]['tokens_per_second']:>12.1f}"
              f"{entry['1']['ttft_median_s']:>10.3f}{entry.get('perplexity', math.nan):>12.3f}"
              f"{entry.get('top1_agreement', math.nan):>14.4f}")
    print("machine limit at one request (weight reads at ~33 GB/s): ~63 tok/s float32, ~400 int4")
    (args.out / "cpu_peers.json").write_text(json.dumps(results, indent=2))
    plot(results, args.concurrency, args.out / "cpu_peers.png")


if __name__ == "__main__":
    main()
