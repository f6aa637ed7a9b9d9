"""Perplexity and bits per byte of a text through the engine, for the base model or an adapter, with rolling windows.

The text's tokens come after the tokenizer's BOS token (its EOS when it has none, as lm-evaluation-harness's rolling
loglikelihood does), so every token of the text is scored. Windows of up to --window tokens start every --stride
tokens; each token is scored once, by the first window that holds it past the previous window's end, so it sees
at least window - stride tokens of context (Hugging Face's "perplexity of fixed-length models"). The windows run
as score-only requests (prompt_logprobs, max_tokens 0), all at once, so the engine batches them.

--compare runs the same windows through transformers (PEFT with --adapter) and prints both figures side by side
with their relative difference, and each side's tokens/s.

Usage: python -m benchmarks.perplexity [--text README.md] [--adapter DIR] [--window 1024] [--stride 512]
                                       [--dtype auto] [--quantization auto] [--device auto] [--compare] [--out DIR]
Prints a table, writes perplexity.json and perplexity.png under --out.
"""
import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.embedded import add_device_and_out
from loraserve.config import ServerConfig
from loraserve.engine.async_engine import resolve_device, resolve_dtype
from loraserve.engine.engine import LLMEngine
from loraserve.engine.outputs import TokenLogprob
from loraserve.engine.sampling_params import SamplingParams
from loraserve.model.embedded import embedded_gguf_path
from loraserve.model.loader import load_model
from loraserve.model.tokenizer import Tokenizer


@dataclass
class Window:
    tokens: list[int]
    first_scored: int  # the window's first position whose token it scores (each position q scores token q)


def text_tokens(tokenizer: Tokenizer, text: str) -> list[int]:
    """The text's tokens after a prefix token that gives the first of them a context."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_ids[0]
    return [prefix, *tokenizer.encode(text, add_special_tokens=False)]


def rolling_windows(tokens: list[int], window: int, stride: int) -> list[Window]:
    windows, scored_until = [], 1  # the prefix token is context only
    for begin in range(0, len(tokens), stride):
        end = min(begin + window, len(tokens))
        windows.append(Window(tokens[begin:end], scored_until - begin))
        scored_until = end
        if end == len(tokens):
            break
    return windows


def engine_scores(engine: LLMEngine, windows: list[Window], adapter: str | None, alternatives: int = 0
                  ) -> list[TokenLogprob]:
    """Every scored token's logprob (and its `alternatives` most likely), in the text's order; every window is a
    score-only request, all in flight together."""
    reference = engine.adapters.resolve(adapter) if adapter else None
    for index, window in enumerate(windows):
        if reference is not None:
            engine.adapters.pin(reference)  # each request owns one pin, and drops it when it ends
        engine.add_request(f"window-{index}", window.tokens,
                           SamplingParams(max_tokens=0, prompt_logprobs=alternatives), reference)
    if reference is not None:
        engine.adapters.unpin(reference)
    scores: dict[int, list[TokenLogprob]] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.error is not None:
                raise output.error
            index = int(output.request_id.removeprefix("window-"))
            scores[index] = output.prompt_logprobs[windows[index].first_scored:]
            print(f"\r  loraserve: {len(scores)}/{len(windows)} windows", end="", file=sys.stderr)
    print(file=sys.stderr)
    return [score for index in range(len(windows)) for score in scores[index]]


def engine_log_likelihood(engine: LLMEngine, windows: list[Window], adapter: str | None) -> float:
    """The sum of the scored tokens' logprobs."""
    return sum(score.logprob for score in engine_scores(engine, windows, adapter))


@torch.no_grad()
def torch_log_likelihood(model: torch.nn.Module, windows: list[Window]) -> float:
    """The same sum from a Hugging Face (or PEFT) causal LM's forward, one window at a time, in float64."""
    total = 0.0
    for window in windows:
        logits = model(torch.tensor([window.tokens])).logits[0].double()
        logprobs = logits.log_softmax(dim=-1)
        positions = torch.arange(window.first_scored, len(window.tokens))
        total += logprobs[positions - 1, torch.tensor(window.tokens)[positions]].sum().item()
    return total


def summary(log_likelihood: float, num_tokens: int, num_bytes: int, seconds: float) -> dict:
    return {"log_likelihood": log_likelihood, "perplexity": math.exp(-log_likelihood / num_tokens),
            "bits_per_byte": -log_likelihood / math.log(2) / num_bytes, "seconds": seconds,
            "tokens_per_second": num_tokens / seconds}


def load_transformers(adapter: Path | None) -> torch.nn.Module:
    """transformers' own GGUF loading of the embedded model (dequantized to float32), PEFT's with an adapter."""
    from transformers import AutoModelForCausalLM

    path = embedded_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter).eval()
    return model


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["systems"])
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.bar(names, [results["systems"][name]["perplexity"] for name in names], color=["#3b7dd8", "#999999"])
    for index, name in enumerate(names):
        entry = results["systems"][name]
        axis.text(index, entry["perplexity"], f"{entry['perplexity']:.3f}\n{entry['tokens_per_second']:.0f} tok/s",
                  ha="center", va="bottom")
    axis.set_ylabel("perplexity")
    axis.set_title(f"{results['text']}: {results['tokens']} tokens, window {results['window']}, "
                   f"stride {results['stride']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=Path("README.md"))
    parser.add_argument("--adapter", type=Path, help="a PEFT LoRA directory for the embedded model")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--quantization", default="auto", choices=("auto", "none", "int4", "int8"))
    parser.add_argument("--compare", action="store_true", help="the same windows through transformers (PEFT)")
    add_device_and_out(parser)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print("loading the embedded model...", file=sys.stderr)
    loaded = load_model("embedded", resolve_device(args.device), resolve_dtype(args.dtype), args.quantization)
    text = args.text.read_text()
    tokens = text_tokens(loaded.tokenizer, text)
    windows = rolling_windows(tokens, args.window, args.stride)
    engine = LLMEngine(loaded, ServerConfig(max_model_len=args.window + 1))
    if args.adapter is not None:
        engine.adapters.add_from_path("perplexity", args.adapter)
    started = time.perf_counter()
    systems = {"loraserve": engine_log_likelihood(engine, windows, "perplexity" if args.adapter else None)}
    seconds = {"loraserve": time.perf_counter() - started}
    if args.compare:
        print("  transformers...", file=sys.stderr)
        model, name = load_transformers(args.adapter), "transformers" if args.adapter is None else "PEFT"
        started = time.perf_counter()
        systems[name] = torch_log_likelihood(model, windows)
        seconds[name] = time.perf_counter() - started
    num_tokens, num_bytes = len(tokens) - 1, len(text.encode())
    results = {"text": str(args.text), "tokens": num_tokens, "bytes": num_bytes, "window": args.window,
               "stride": args.stride, "windows": len(windows), "adapter": str(args.adapter) if args.adapter else None,
               "dtype": args.dtype, "quantization": args.quantization,
               "systems": {name: summary(value, num_tokens, num_bytes, seconds[name])
                           for name, value in systems.items()}}
    print(f"\n{args.text}: {num_tokens} tokens, {num_bytes} bytes, {len(windows)} windows of {args.window} "
          f"(stride {args.stride})")
    print(f"{'system':<14}{'perplexity':>12}{'bits/byte':>11}{'tokens/s':>10}")
    for name, entry in results["systems"].items():
        print(f"{name:<14}{entry['perplexity']:>12.4f}{entry['bits_per_byte']:>11.4f}"
              f"{entry['tokens_per_second']:>10.1f}")
    if len(systems) == 2:
        ours, theirs = (entry["perplexity"] for entry in results["systems"].values())
        results["relative_difference"] = ours / theirs - 1
        print(f"relative difference: {results['relative_difference']:+.2e}")
    (args.out / "perplexity.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "perplexity.png")


if __name__ == "__main__":
    main()
