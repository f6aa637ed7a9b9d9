"""Constrained against unconstrained decoding on the embedded model, in process: output tokens/s at batch 1 and 16
once the grammar is warm, and a new grammar's first request (compiled first): its time to first token and tokens/s,
against a second request of the same grammar. llguidance builds its lexer's states as a generation first reaches
them, so a grammar's first request computes slower masks than later ones.

Constrained requests answer a JSON schema of twelve short strings (about 60-90 tokens); unconstrained ones the same
prompts, each with as many tokens as its constrained twin (so both runs hold as many requests at every step), EOS
ignored. Both greedy, no speculation. The machine's limit is the unconstrained row: a grammar adds its token mask
(llguidance, per row and step) and the matcher's advance per token.

Then batch 16 sampled at temperature 1 (seeded; twins likewise), and the grammar a chat request with tools runs
under `auto` (free text; calls held to the tool's schema), batch 16.

Usage: python -m benchmarks.structured [--device auto] [--repeats 5] [--out DIR]
Prints a table, writes structured.json and structured.png under --out.
"""
import argparse
import json
import statistics
import sys
import time

from benchmarks.embedded import add_device_and_out, load_embedded
from loraserve.api.tool_schema import ToolFields
from loraserve.config import ServerConfig
from loraserve.engine.engine import LLMEngine
from loraserve.engine.grammar import GrammarSpec
from loraserve.engine.sampling_params import SamplingParams

SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 12, "maxItems": 12}
QUESTIONS = ["List twelve fruits.", "Name twelve cities.", "Give twelve colours.", "Write twelve short words."]


def run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]
        ) -> tuple[list[int], float, float]:
    """All requests at once until done: (each request's output tokens, seconds, seconds to the first token of the
    first)."""
    started, first_token = time.perf_counter(), None
    for index, (prompt, request_params) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{index}", prompt, request_params)
    tokens = [0] * len(prompts)
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens[int(output.request_id[1:])] += len(output.token_ids)
            if first_token is None and output.token_ids:
                first_token = time.perf_counter() - started
    return tokens, time.perf_counter() - started, first_token


def throughput(engine: LLMEngine, prompts: list[list[int]], batch: int, repeats: int, spec: GrammarSpec,
               max_tokens: int = 200, temperature: float = 0.0) -> dict[str, float]:
    """Constrained and unconstrained runs, alternating `repeats` times; the median of each (this VM's speed drifts
    by 10-20% from run to run, more than the difference measured)."""
    engine.grammars.compile(spec)
    run(engine, prompts[:1], [SamplingParams(max_tokens=max_tokens, temperature=0.0, grammar=spec)])  # warm
    chosen = [prompts[index % len(prompts)] for index in range(batch)]
    plain, constrained = [], []
    for _ in range(repeats):
        constrained_tokens, constrained_seconds, _ = run(engine, chosen, [SamplingParams(
            max_tokens=max_tokens, temperature=temperature, seed=index, grammar=spec) for index in range(batch)])
        # Each unconstrained twin writes as many tokens as its constrained request, so both runs hold the same
        # number of requests at every step: the difference is the grammar's cost, not how the lengths spread.
        plain_tokens, plain_seconds, _ = run(engine, chosen, [SamplingParams(
            max_tokens=max(1, count), temperature=temperature, seed=index, ignore_eos=True)
            for index, count in enumerate(constrained_tokens)])
        plain.append(sum(plain_tokens) / plain_seconds)
        constrained.append(sum(constrained_tokens) / constrained_seconds)
    plain_median, constrained_median = statistics.median(plain), statistics.median(constrained)
    return {"unconstrained_tokens_per_second": plain_median, "constrained_tokens_per_second": constrained_median,
            "ratio": constrained_median / plain_median, "tokens_per_request": sum(constrained_tokens) // batch}


def auto_tools_spec() -> GrammarSpec:
    """The grammar a chat request with one tool runs under `auto`: free text, Hermes calls held to the schema."""
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"query": {"type": "string", "maxLength": 24}}, "required": ["query"]}}}
    return ToolFields.model_validate({"tools": [tool]}).tool_grammar_spec()


def first_token(engine: LLMEngine, prompt: list[int], seed: int) -> dict[str, float]:
    """A schema never seen (compiled, as the API does before submitting), then the same schema again."""
    schema = dict(SCHEMA, description=f"fresh {seed}")  # a new spec: nothing cached
    spec = GrammarSpec("json_schema", json.dumps(schema))
    results = {}
    for name in ("cold", "cached"):
        started = time.perf_counter()
        engine.grammars.compile(spec)
        compiled = time.perf_counter() - started
        tokens, seconds, ttft = run(engine, [prompt], [SamplingParams(max_tokens=200, temperature=0.0, grammar=spec)])
        results |= {f"{name}_ttft_seconds": compiled + ttft, f"{name}_compile_seconds": compiled,
                    f"{name}_tokens_per_second": tokens[0] / (compiled + seconds)}
    _, _, results["unconstrained_ttft_seconds"] = run(engine, [prompt], [SamplingParams(max_tokens=1)])
    return results


def plot(results: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(results["throughput"])
    figure, axis = plt.subplots(figsize=(6, 3.5))
    width = 0.38
    for offset, (key, label) in enumerate((("unconstrained_tokens_per_second", "unconstrained"),
                                           ("constrained_tokens_per_second", "JSON schema"))):
        values = [results["throughput"][batch][key] for batch in batches]
        axis.bar([index + offset * width for index in range(len(batches))], values, width, label=label)
    axis.set_xticks([index + width / 2 for index in range(len(batches))], [f"batch {batch}" for batch in batches])
    axis.set_ylabel("output tokens/s")
    axis.set_title(f"constrained decoding, embedded model, {results['device']}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_and_out(parser)
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs per batch size; medians reported")
    args = parser.parse_args()
    loaded = load_embedded(args)
    tokenizer = loaded.tokenizer
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": question}]),
                                add_special_tokens=False) for question in QUESTIONS]
    engine = LLMEngine(loaded, ServerConfig(prefix_caching=False))
    run(engine, prompts[:1], [SamplingParams(max_tokens=8)])  # warm up
    results = {"device": str(next(loaded.model.parameters()).device), "throughput": {}}
    for batch in (1, 16):
        print(f"batch {batch}...", file=sys.stderr)
        results["throughput"][batch] = throughput(engine, prompts, batch, args.repeats,
                                                  GrammarSpec("json_schema", json.dumps(SCHEMA)))
    print("batch 16 sampled at temperature 1...", file=sys.stderr)
    results["sampled"] = throughput(engine, prompts, 16, args.repeats, GrammarSpec("json_schema", json.dumps(SCHEMA)),
                                    temperature=1.0)
    print("tools under auto, batch 16...", file=sys.stderr)
    results["auto_tools"] = throughput(engine, prompts, 16, args.repeats, auto_tools_spec(), max_tokens=64)
    results["first_token"] = first_token(engine, prompts[0], seed=int(time.time()))
    print(f"\n{'batch':>5}{'unconstrained tok/s':>21}{'JSON schema tok/s':>19}{'ratio':>7}{'tokens':>8}")
    for batch, entry in results["throughput"].items():
        print(f"{batch:>5}{entry['unconstrained_tokens_per_second']:>21.1f}"
              f"{entry['constrained_tokens_per_second']:>19.1f}{entry['ratio']:>7.2f}{entry['tokens_per_request']:>8}")
    sampled = results["sampled"]
    print(f"batch 16 sampled at temperature 1: {sampled['constrained_tokens_per_second']:.1f} against "
          f"{sampled['unconstrained_tokens_per_second']:.1f} tok/s, ratio {sampled['ratio']:.2f}")
    auto = results["auto_tools"]
    print(f"tools under auto (free text, calls held to one tool's schema), batch 16: "
          f"{auto['constrained_tokens_per_second']:.1f} against {auto['unconstrained_tokens_per_second']:.1f} tok/s, "
          f"ratio {auto['ratio']:.2f}")
    timing = results["first_token"]
    print(f"time to first token: unconstrained {timing['unconstrained_ttft_seconds'] * 1000:.1f} ms, new schema "
          f"{timing['cold_ttft_seconds'] * 1000:.1f} ms (compile {timing['cold_compile_seconds'] * 1000:.1f}), "
          f"cached {timing['cached_ttft_seconds'] * 1000:.1f} ms")
    print(f"a new schema's first request: {timing['cold_tokens_per_second']:.1f} tok/s, its second "
          f"{timing['cached_tokens_per_second']:.1f} tok/s (batch 1)")
    (args.out / "structured.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "structured.png")


if __name__ == "__main__":
    main()
