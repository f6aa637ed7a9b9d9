"""Prefill work and time to first token with the prefix cache on and off, on the embedded model.

Usage: python -m benchmarks.prefix_cache [--requests 32] [--system-tokens 1024] [--question-tokens 64]
                                         [--max-tokens 8] [--device auto] [--out benchmarks/out]
Every request is one shared system prompt followed by its own question (random token ids, seeded); all arrive at
once, in-process (LLMEngine, no HTTP, so the figures are the engine's own). Counts the prompt tokens the model
computes and times each request from arrival to its first token. Prints a table, writes prefix_cache.json and
prefix_cache.png under --out; progress goes to stderr.
"""
import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from loraserve.config import ServerConfig
from benchmarks.embedded import add_device_and_out, load_embedded
from loraserve.engine.engine import LLMEngine
from loraserve.engine.sampling_params import SamplingParams
from loraserve.engine.model_runner import StepOutput
from loraserve.engine.scheduler import ScheduledBatch
from loraserve.model.loader import LoadedModel


def make_prompts(count: int, system_tokens: int, question_tokens: int, vocab_size: int) -> list[list[int]]:
    rng = random.Random(0)
    system = [rng.randrange(100, vocab_size) for _ in range(system_tokens)]
    return [system + [rng.randrange(100, vocab_size) for _ in range(question_tokens)] for _ in range(count)]


class PrefillCounter:
    """Counts the prompt tokens an engine's model computes, by wrapping its runner."""

    def __init__(self, engine: LLMEngine) -> None:
        self.total = 0
        self._execute = engine.runner.execute
        engine.runner.execute = self._count

    def _count(self, batch: ScheduledBatch) -> StepOutput:
        self.total += sum(max(0, min(num_new, sequence.num_prompt_tokens - sequence.num_computed_tokens))
                          for sequence, num_new in zip(batch.sequences, batch.num_new_tokens))
        return self._execute(batch)


def measure(loaded: LoadedModel, prompts: list[list[int]], max_tokens: int, caching: bool) -> dict:
    """Submit every prompt at once and step the engine until all finish."""
    config = ServerConfig(block_size=16, kv_cache_memory=2 << 30, prefix_caching=caching)
    engine = LLMEngine(loaded, config)
    warm_up = [list(range(10, 42))]  # shares nothing with the prompts
    engine.generate(warm_up, SamplingParams(max_tokens=2))
    prefill_tokens = PrefillCounter(engine)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    for index, prompt in enumerate(prompts):
        engine.add_request(str(index), prompt, params)
    first_token: dict[str, float] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            first_token.setdefault(output.request_id, time.perf_counter() - start)
        print(f"\r  cache {'on' if caching else 'off'}: {len(first_token)}/{len(prompts)} first tokens, "
              f"{prefill_tokens.total} prompt tokens computed", end="", file=sys.stderr)
    print(file=sys.stderr)
    times = sorted(first_token.values())
    metrics = engine.metrics
    return {"prefix_caching": caching, "prefill_tokens": prefill_tokens.total,
            "cache_hit_tokens": int(metrics.prefix_cache_hits._value.get()),
            "ttft_median_s": statistics.median(times), "ttft_p99_s": percentile(times, 99),
            "total_s": time.perf_counter() - start}


def percentile(values: list[float], percent: float) -> float:
    """Linear interpolation between the closest ranks of sorted `values`."""
    rank = (len(values) - 1) * percent / 100
    low = int(rank)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    off, on = summary["results"]
    labels, colors = ["cache off", "cache on"], ["#999999", "#3b7dd8"]
    figure, (tokens_axis, time_axis) = plt.subplots(1, 2, figsize=(9, 3.8))
    tokens_axis.bar(labels, [off["prefill_tokens"], on["prefill_tokens"]], color=colors)
    tokens_axis.set_ylabel("prompt tokens computed")
    tokens_axis.set_title(f"prefill work ({summary['prefill_reduction']:.1f}x less)")
    width = 0.38
    for offset, (result, label, color) in enumerate(zip((off, on), labels, colors)):
        positions = [index + (offset - 0.5) * width for index in range(2)]
        time_axis.bar(positions, [result["ttft_median_s"], result["ttft_p99_s"]], width, label=label, color=color)
    time_axis.set_xticks([0, 1], ["median", "p99"])
    time_axis.set_ylabel("time to first token (s)")
    time_axis.set_title("time to first token")
    time_axis.legend()
    figure.suptitle(f"{summary['requests']} requests: {summary['system_tokens']}-token shared system prompt + "
                    f"{summary['question_tokens']}-token question, embedded model, {summary['device']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def print_table(off: dict, on: dict) -> None:
    rows = [("prompt tokens computed", "prefill_tokens", "{:.0f}"), ("cache hit tokens", "cache_hit_tokens", "{:.0f}"),
            ("TTFT median (s)", "ttft_median_s", "{:.2f}"), ("TTFT p99 (s)", "ttft_p99_s", "{:.2f}"),
            ("all done (s)", "total_s", "{:.2f}")]
    print(f"\n{'':<24}{'cache off':>12}{'cache on':>12}{'off/on':>9}")
    for title, key, form in rows:
        ratio = f"{off[key] / on[key]:.1f}x" if off[key] and on[key] else "-"
        print(f"{title:<24}{form.format(off[key]):>12}{form.format(on[key]):>12}{ratio:>9}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--system-tokens", type=int, default=1024)
    parser.add_argument("--question-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=8)
    add_device_and_out(parser)
    args = parser.parse_args()
    loaded = load_embedded(args)
    device = next(loaded.model.parameters()).device
    prompts = make_prompts(args.requests, args.system_tokens, args.question_tokens, loaded.config.vocab_size)
    off, on = (measure(loaded, prompts, args.max_tokens, caching) for caching in (False, True))
    summary = {"requests": args.requests, "system_tokens": args.system_tokens,
               "question_tokens": args.question_tokens, "max_tokens": args.max_tokens, "device": str(device),
               "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "prefill_reduction": off["prefill_tokens"] / on["prefill_tokens"], "results": [off, on]}
    print_table(off, on)
    (args.out / "prefix_cache.json").write_text(json.dumps(summary, indent=2))
    plot(summary, args.out / "prefix_cache.png")


if __name__ == "__main__":
    main()
