"""Two engine replicas on Ray Serve: adapter-affinity routing against routing by load alone.

Usage: python -m benchmarks.scaleout [--adapters 64] [--requests 320] [--max-tokens 8] [--max-loras 32]
                                     [--out benchmarks/out]
Each run starts `loraserve serve --replicas 2` on the embedded model, with `--adapters` LoRA adapters (ranks 8 to
64, as benchmarks.adapters makes them) in its shared adapter directory and room for `--max-loras` of them per
replica (slots and CPU copies): between them the two replicas hold them all, one alone holds half. All requests
arrive at once, each with an adapter drawn uniformly. Adapter loads (into slots and into host memory, summed over
replicas from the merged /metrics) are counted per 1,000 requests, with throughput and latency; a base-only run is
the bound (the same two replicas, no adapter to read or apply). Prints a table, writes scaleout.json and
scaleout.png under --out; progress goes to stderr.
"""
import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.adapters import choose_adapters, percentile, place_adapters, run_load
from benchmarks.serve_throughput import free_port, make_prompts, start_server

ROUTINGS = {"adapter": "adapter affinity", "load": "load only"}


def adapter_loads(port: int) -> dict[str, float]:
    """Loads so far into each tier ("gpu": slots, "cpu": host copies), summed over the replicas."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    loads = {"gpu": 0.0, "cpu": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "loraserve:adapter_loads_total":
                loads[sample.labels["tier"]] += sample.value
    return loads


def measure(routing: str | None, args: argparse.Namespace, store: Path, names: list[str]) -> dict:
    """One server's run; `routing` None is the base-only bound."""
    port = free_port()
    flags = ["--replicas", "2", "--replica-routing", routing or "adapter", "--adapter-dir", str(store),
             "--max-loras", str(args.max_loras), "--max-cpu-loras", str(args.max_loras)]
    print(f"starting 2 replicas ({ROUTINGS.get(routing, 'base only')})...", file=sys.stderr)
    server = start_server(port, *flags)
    try:
        models = choose_adapters(names, len(names) if routing else 0, args.requests, zipf=False)
        before = adapter_loads(port)
        print(f"{args.requests} requests x {args.max_tokens} tokens...", file=sys.stderr)
        tokens, seconds, latencies = asyncio.run(run_load(port, make_prompts(args.requests), args.max_tokens,
                                                          models))
        asyncio.run(asyncio.sleep(3))  # the replicas post their metrics every 2 s
        after = adapter_loads(port)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    per_thousand = 1000 / args.requests
    return {"routing": routing or "base", "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
            "p50_seconds": statistics.median(latencies), "p99_seconds": percentile(latencies, 0.99),
            "slot_loads_per_1000": (after["gpu"] - before["gpu"]) * per_thousand,
            "host_loads_per_1000": (after["cpu"] - before["cpu"]) * per_thousand}


def print_table(results: list[dict]) -> None:
    bound = results[0]["tokens_per_second"]
    print(f"\n{'routing':<18}{'tokens/s':>10}{'of bound':>10}{'p50 (s)':>9}{'p99 (s)':>9}{'slot loads':>12}"
          f"{'host loads':>12}   (loads per 1,000 requests)")
    for result in results:
        print(f"{ROUTINGS.get(result['routing'], 'base only (bound)'):<18}{result['tokens_per_second']:>10.1f}"
              f"{result['tokens_per_second'] / bound:>10.2f}{result['p50_seconds']:>9.2f}{result['p99_seconds']:>9.2f}"
              f"{result['slot_loads_per_1000']:>12.0f}{result['host_loads_per_1000']:>12.0f}")


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = summary["results"]
    labels = [ROUTINGS.get(result["routing"], "base only") for result in results]
    colors = ["#999999", "#3b7dd8", "#d8823b"][:len(results)]
    figure, (speed_axis, loads_axis) = plt.subplots(1, 2, figsize=(9, 3.8))
    speed_axis.bar(labels, [result["tokens_per_second"] for result in results], color=colors)
    speed_axis.set_ylabel("output tokens/s")
    speed_axis.set_title("throughput")
    loads_axis.bar(labels[1:], [result["host_loads_per_1000"] for result in results[1:]], color=colors[1:])
    loads_axis.set_ylabel("adapter reads per 1,000 requests")
    loads_axis.set_title("adapter loads")
    figure.suptitle(f"2 replicas, {summary['adapters']} adapters, {summary['max_loras']} per replica, "
                    f"{summary['requests']} requests x {summary['max_tokens']} tokens, embedded model")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-loras", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        store = Path(scratch) / "store"
        names = place_adapters(store, Path(scratch) / "sources", args.adapters)
        results = [measure(routing, args, store, names) for routing in (None, "adapter", "load")]
    summary = {"adapters": args.adapters, "requests": args.requests, "max_tokens": args.max_tokens,
               "max_loras": args.max_loras, "cpu_count": os.cpu_count(), "results": results}
    print_table(results)
    (args.out / "scaleout.json").write_text(json.dumps(summary, indent=2))
    plot(summary, args.out / "scaleout.png")


if __name__ == "__main__":
    main()
