"""Decode tokens/s with speculative decoding on and off, on the embedded model: prompt lookup (n-gram), Medusa
heads (--medusa-heads, as benchmarks.train_medusa makes them) and a draft model (--draft-model; no smaller model of
the embedded model's vocabulary ships with it, so only when given).

Usage: python -m benchmarks.spec_decode [--spec-tokens 4] [--max-tokens 128] [--prompts 4] [--batch 8]
                                        [--medusa-heads DIR] [--draft-model PATH] [--every-draft] [--device auto]
                                        [--out benchmarks/out]
Two workloads of chat prompts, greedy: "repeating" asks the model to reproduce a passage (so prompt lookup finds
what comes next in the prompt), "non-repeating" asks open questions (so it rarely finds anything). Each runs at
batch 1 (--prompts requests, one at a time) and at batch --batch (that many requests submitted at once), on fresh
engines, one without speculation and one per proposer, in-process (LLMEngine, no HTTP). The engines take turns
step by step, so a change in the machine's load hits all alike. Decode tokens/s leaves prefill out: it counts the tokens
of the steps after the one that gave the last request of a group its first token, over those steps' time.
"verified" is the share of the proposer's guesses that were verified (all of them with --no-spec-adaptive; by
default, those expected to pay for their rows). Acceptance is accepted / draft tokens verified; per position i,
drafts whose token i was accepted / drafts. "same output"
counts requests whose greedy output is identical with and without speculation (it must be all of them). Prints a
table, writes spec_decode.json and spec_decode.png under --out; progress goes to stderr.
"""
import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from loraserve.config import ServerConfig
from benchmarks.embedded import add_device_and_out, load_embedded
from loraserve.engine.engine import LLMEngine
from loraserve.engine.sampling_params import SamplingParams
from loraserve.engine.async_engine import resolve_dtype
from loraserve.model.loader import LoadedModel, load_model

PASSAGES = {
    "lighthouse": (
        "The lighthouse on the northern cape was built in 1868, after three ships were lost on the rocks in a single "
        "winter. Its first keeper, a retired sailor named Thomas Reed, lived in the small stone cottage beside the "
        "tower with his wife and their four children. Every evening at sunset he climbed the one hundred and twelve "
        "steps to light the lamp, and every morning he climbed them again to trim the wick and polish the lens. The "
        "lens itself came from a workshop in Paris and was made of more than three hundred pieces of glass, each one "
        "ground by hand. On a clear night its beam could be seen from twenty miles out at sea. In the great storm of "
        "1891 the waves broke over the cliff and flooded the cottage, but the lamp never went out. The family "
        "carried oil up the stairs in buckets for two days and two nights. Today the light is automatic, and the "
        "cottage is a small museum where visitors can read the keeper's logbook and see the brass tools he used."),
    "bread": (
        "Baking bread at home takes patience more than skill. You need only flour, water, salt and yeast, but the "
        "way you combine them and the time you give them make all the difference. Start by mixing the flour and "
        "water and letting them rest for half an hour, which allows the flour to absorb the water and makes the "
        "dough easier to knead. Then add the salt and the yeast and knead the dough for about ten minutes, until it "
        "feels smooth and springs back when you press it with a finger. Cover the bowl and leave it in a warm place "
        "until the dough has doubled in size. This can take one hour on a summer day or three hours in winter. Shape "
        "the dough into a round loaf, let it rise again, and bake it in a very hot oven. A tray of water on the "
        "bottom shelf fills the oven with steam and gives the loaf a crisp and shiny crust. Let the bread cool "
        "before you cut it, because the inside is still cooking when it comes out of the oven."),
    "bees": (
        "A honeybee colony is a family of one queen, a few hundred drones and tens of thousands of workers. The "
        "queen lays all the eggs, sometimes more than a thousand in a single day during spring. The drones are male "
        "bees whose only task is to mate with a queen from another colony. The workers are female, and they do "
        "everything else. A young worker first cleans the cells of the comb, then feeds the larvae, then builds new "
        "comb from wax that she makes in her own body. Only in the last weeks of her life does she leave the hive "
        "to collect nectar and pollen from flowers. When a worker finds a good patch of flowers, she returns to the "
        "hive and performs a dance on the comb. The direction of the dance tells the other bees where the flowers "
        "are, and its length tells them how far away they are. In winter the bees cluster together in a tight ball "
        "and shiver their muscles to keep the queen warm until the spring returns."),
    "bicycles": (
        "Ten years ago the city had almost no bicycle lanes, and only a few brave people cycled to work. Then the "
        "council painted the first lanes along the river and closed the old market square to cars. At first many "
        "shop owners complained that they would lose their customers. The opposite happened. People who walked or "
        "cycled through the square stopped more often than drivers ever had, and the cafes put their tables out on "
        "the street. The council added more lanes every year and built a bridge for bicycles and pedestrians over "
        "the railway. Today one journey in five across the city is made by bicycle, and the air near the schools is "
        "measurably cleaner. Parents let their children ride to school on their own again. The city still has "
        "problems: the lanes are crowded at rush hour, there are not enough places to park a bicycle near the "
        "station, and some drivers still park in the lanes. But few people would want to go back to the way it was."),
}
EVERY_DRAFT = ", every draft"  # an engine verifying every draft (--no-spec-adaptive), with --every-draft
SUBJECTS = {"lighthouse": "the lamp", "bread": "the dough", "bees": "the workers", "bicycles": "the lanes"}
OPEN_QUESTIONS = [
    "Write a short story about a robot who learns to paint.",
    "Explain why the sky is blue.",
    "What are the benefits of regular exercise?",
    "Describe a day in the life of a medieval farmer.",
    "Give some advice to someone starting their first job.",
    "Why do leaves change colour in autumn?",
    "Write a poem about the sea at night.",
    "How does a refrigerator keep food cold?",
]


def repeating_messages() -> list[str]:
    """Prompts whose answer copies its input: reproduce each passage, then extract sentences from each."""
    reproduce = [f"Reproduce the following passage exactly, word for word:\n\n{text}" for text in PASSAGES.values()]
    extract = [f"Copy out the sentences of this passage that mention {SUBJECTS[name]}:\n\n{text}"
               for name, text in PASSAGES.items()]
    return reproduce + extract


def chat_prompts(loaded: LoadedModel, messages: list[str], count: int) -> list[list[int]]:
    """`count` user messages (cycling) rendered with the model's chat template: an instruct model answers them."""
    tokenizer = loaded.tokenizer
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": messages[index % len(messages)]}])
                for index in range(count)]
    return [tokenizer.encode(text, add_special_tokens=False) for text in rendered]


def spec_counters(engine: LLMEngine, positions: int) -> list[float]:
    """Drafts, draft tokens, accepted tokens, guesses left unverified, then accepted at each position: read before
    and after timing, so the warm-up does not count."""
    metrics = engine.metrics
    values = [metrics.spec_drafts._value.get(), metrics.spec_draft_tokens._value.get(),
              metrics.spec_accepted_tokens._value.get(), metrics.spec_unverified_tokens._value.get()]
    return values + [metrics.spec_accepted_per_position.labels(position=str(position))._value.get()
                     for position in range(positions)]


class GroupRun:
    """A group of requests submitted at once to one engine, stepped from outside so that two engines can take
    turns step by step: a change in the machine's load then hits both alike."""

    def __init__(self, engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, first_id: int) -> None:
        self.engine = engine
        self.request_ids = [str(first_id + index) for index in range(len(prompts))]
        for request_id, prompt in zip(self.request_ids, prompts):
            engine.add_request(request_id, prompt, params)
        self.outputs: dict[str, list[int]] = {request_id: [] for request_id in self.request_ids}
        self.decode_tokens, self.decode_seconds = 0, 0.0

    @property
    def done(self) -> bool:
        return not self.engine.has_unfinished_requests()

    def step(self) -> None:
        """One engine step; it counts as decode once every request of the group has its first token."""
        all_started = all(self.outputs.values())
        start = time.perf_counter()
        step_outputs = self.engine.step()
        seconds = time.perf_counter() - start
        for output in step_outputs:
            self.outputs[output.request_id].extend(output.token_ids)
        if all_started:
            self.decode_tokens += sum(len(output.token_ids) for output in step_outputs)
            self.decode_seconds += seconds


def make_engine(loaded: LoadedModel, proposer: str, batch: int, args: argparse.Namespace,
                draft: LoadedModel | None = None) -> LLMEngine:
    """A fresh engine proposing with `proposer` ("none" for plain decoding), warmed up on a prompt that repeats, so
    prompt lookup proposes during the warm-up too."""
    spec_tokens = 0 if proposer == "none" else args.spec_tokens
    every_draft = proposer.endswith(EVERY_DRAFT)
    config = ServerConfig(spec_tokens=spec_tokens, spec_ngram_min=args.ngram_min, spec_ngram_max=args.ngram_max,
                          medusa_heads=str(args.medusa_heads) if proposer.startswith("Medusa heads") else None,
                          spec_adaptive=not every_draft, block_size=16, kv_cache_memory=256 << 20,
                          max_num_seqs=batch)
    engine = LLMEngine(loaded, config, draft=draft if proposer.startswith("draft model") else None)
    warm_up = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    engine.generate([list(range(10, 26)) * 3] * batch, warm_up)
    return engine


def measure(loaded: LoadedModel, prompts: list[list[int]], batch: int, proposers: list[str],
            args: argparse.Namespace, draft: LoadedModel | None) -> list[dict]:
    """`prompts` in groups of `batch` on fresh engines, one without speculation and one per proposer, taking turns
    step by step. Returns each engine's summary, the plain one first."""
    spec_tokens = args.spec_tokens
    names = ["none", *proposers]
    engines = [make_engine(loaded, name, batch, args, draft) for name in names]
    before = [spec_counters(engine, spec_tokens) for engine in engines]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    runs: list[list[GroupRun]] = [[] for _ in engines]
    for start in range(0, len(prompts), batch):
        group = [GroupRun(engine, prompts[start:start + batch], params, start) for engine in engines]
        while not all(run.done for run in group):
            for run in group:
                if not run.done:
                    run.step()
        for runs_of_engine, run in zip(runs, group):
            runs_of_engine.append(run)
        print(f"\r  batch {batch}: {start + len(group[0].request_ids)}/{len(prompts)} requests", end="",
              file=sys.stderr)
    print(file=sys.stderr)
    summaries = []
    for name, engine, earlier, runs_of_engine in zip(names, engines, before, runs):
        drafts, draft_tokens, accepted, unverified, *per_position = (
            after - value for after, value in zip(spec_counters(engine, spec_tokens), earlier))
        summary = summarize(runs_of_engine)
        summary.update({"proposer": name, "drafts": int(drafts), "draft_tokens": int(draft_tokens),
                        "accepted_tokens": int(accepted), "unverified_tokens": int(unverified),
                        "acceptance": accepted / draft_tokens if draft_tokens else 0.0,
                        "acceptance_per_position": [count / drafts if drafts else 0.0 for count in per_position]})
        summaries.append(summary)
    return summaries


def summarize(runs: list[GroupRun]) -> dict:
    """One engine's outputs and decode throughput over all its groups."""
    outputs = [run.outputs[request_id] for run in runs for request_id in run.request_ids]
    decode_tokens = sum(run.decode_tokens for run in runs)
    decode_seconds = sum(run.decode_seconds for run in runs)
    return {"outputs": outputs, "generated_tokens": sum(map(len, outputs)), "decode_tokens": decode_tokens,
            "decode_seconds": decode_seconds, "tokens_per_second": decode_tokens / decode_seconds}


def compare(loaded: LoadedModel, workload: str, prompts: list[list[int]], batch: int, proposers: list[str],
            args: argparse.Namespace, draft: LoadedModel | None) -> list[dict]:
    """The same prompts without speculation and with each proposer; greedy, so the outputs must match token for
    token. One result per proposer."""
    without, *speculated = measure(loaded, prompts, batch, proposers, args, draft)
    results = []
    for with_spec in speculated:
        mismatches = [index for index, (plain, output) in enumerate(zip(without["outputs"], with_spec["outputs"]))
                      if plain != output]
        for index in mismatches:
            print(f"  MISMATCH {workload} batch {batch} {with_spec['proposer']} request {index}:\n    without: "
                  f"{loaded.tokenizer.decode(without['outputs'][index])!r}\n    with:    "
                  f"{loaded.tokenizer.decode(with_spec['outputs'][index])!r}", file=sys.stderr)
        results.append({"workload": workload, "batch": batch, "requests": len(prompts),
                        "proposer": with_spec["proposer"], "spec_tokens": args.spec_tokens,
                        "same_output": len(prompts) - len(mismatches), "mismatched_requests": mismatches,
                        "speedup": with_spec["tokens_per_second"] / without["tokens_per_second"],
                        "without": without, "with": with_spec})
    return results


def print_table(results: list[dict]) -> None:
    print(f"\n{'workload':<15}{'batch':>6}  {'proposer':<27}{'spec':>5}{'tok/s without':>15}{'tok/s with':>12}"
          f"{'speedup':>9}{'verified':>9}{'accept':>8}  {'per position':<24}{'same output':>12}{'mean tokens':>12}")
    for result in results:
        with_spec = result["with"]
        per_position = " ".join(f"{value:.2f}" for value in with_spec["acceptance_per_position"])
        mean_tokens = with_spec["generated_tokens"] / result["requests"]
        guesses = with_spec["draft_tokens"] + with_spec["unverified_tokens"]
        verified = with_spec["draft_tokens"] / guesses if guesses else 0.0
        print(f"{result['workload']:<15}{result['batch']:>6}  {result['proposer']:<27}{result['spec_tokens']:>5}"
              f"{result['without']['tokens_per_second']:>15.1f}{with_spec['tokens_per_second']:>12.1f}"
              f"{result['speedup']:>8.2f}x{verified:>9.2f}{with_spec['acceptance']:>8.2f}  {per_position:<24}"
              f"{result['same_output']:>7}/{result['requests']:<4}{mean_tokens:>12.1f}")


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = summary["results"]
    groups = sorted({(result["workload"], result["batch"]) for result in results},
                    key=lambda group: [(r["workload"], r["batch"]) for r in results].index(group))
    proposers = list(dict.fromkeys(result["proposer"] for result in results))
    figure, (speed_axis, accept_axis) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / (len(proposers) + 1)
    colors = ["#999999", "#3b7dd8", "#d8843b", "#3bd87d"]
    by_key = {(result["workload"], result["batch"], result["proposer"]): result for result in results}
    bars = [("no speculation", lambda group: by_key[(*group, proposers[0])]["without"]["tokens_per_second"])]
    bars += [(name, lambda group, name=name: by_key[(*group, name)]["with"]["tokens_per_second"])
             for name in proposers]
    for offset, ((label, value), color) in enumerate(zip(bars, colors)):
        positions = [index + (offset - len(proposers) / 2) * width for index in range(len(groups))]
        speed_axis.bar(positions, [value(group) for group in groups], width, label=label, color=color)
    speed_axis.set_xticks(range(len(groups)), [f"{workload}\nbatch {batch}" for workload, batch in groups],
                          fontsize=8)
    speed_axis.set_ylabel("decode tokens/s")
    speed_axis.set_title("decode throughput")
    speed_axis.legend(fontsize=8)
    for result in results:
        per_position = result["with"]["acceptance_per_position"]
        accept_axis.plot(range(len(per_position)), per_position, marker="o",
                         label=f"{result['proposer']}: {result['workload']}, batch {result['batch']}")
    accept_axis.set_xticks(range(summary["spec_tokens"]))
    accept_axis.set_xlabel("draft position")
    accept_axis.set_ylabel("accepted / drafts")
    accept_axis.set_ylim(0, 1)
    accept_axis.set_title("acceptance by draft position")
    accept_axis.legend(fontsize=6)
    figure.suptitle(f"speculative decoding, greedy, k={summary['spec_tokens']}, max {summary['max_tokens']} tokens, "
                    f"embedded model, {summary['device']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec-tokens", type=int, default=4)
    parser.add_argument("--ngram-min", type=int, default=ServerConfig.spec_ngram_min)
    parser.add_argument("--ngram-max", type=int, default=ServerConfig.spec_ngram_max)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=4, help="requests per workload at batch 1")
    parser.add_argument("--batch", type=int, default=8, help="the larger batch size (as many requests)")
    parser.add_argument("--medusa-heads", type=Path, help="Medusa heads for the embedded model (made by "
                        "benchmarks.train_medusa) to compare beside prompt lookup")
    parser.add_argument("--draft-model", help="a draft model (same tokenizer) to compare too")
    parser.add_argument("--every-draft", action="store_true", help="also run each proposer verifying every draft "
                        "(--no-spec-adaptive), beside the server's default (only drafts expected to pay)")
    add_device_and_out(parser)
    args = parser.parse_args()
    loaded = load_embedded(args)
    device = next(loaded.model.parameters()).device
    draft = load_model(args.draft_model, device, resolve_dtype(args.dtype), "auto") if args.draft_model else None
    proposers = ["prompt lookup"] + ["Medusa heads"] * bool(args.medusa_heads) + ["draft model"] * bool(draft)
    if args.every_draft:
        proposers += [proposer + EVERY_DRAFT for proposer in proposers]
    workloads = {"repeating": repeating_messages(), "non-repeating": OPEN_QUESTIONS}
    results = []
    for workload, messages in workloads.items():
        for batch, count in ((1, args.prompts), (args.batch, args.batch)):
            print(f"{workload}, batch {batch}:", file=sys.stderr)
            results += compare(loaded, workload, chat_prompts(loaded, messages, count), batch, proposers, args, draft)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device} ({os.cpu_count()} cores)"
    summary = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device_name,
               "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "spec_tokens": args.spec_tokens,
               "spec_ngram_min": args.ngram_min, "spec_ngram_max": args.ngram_max, "max_tokens": args.max_tokens,
               "medusa_heads": str(args.medusa_heads) if args.medusa_heads else None, "draft_model": args.draft_model,
               "results": results}
    print_table(results)
    (args.out / "spec_decode.json").write_text(json.dumps(summary, indent=2))
    plot(summary, args.out / "spec_decode.png")


if __name__ == "__main__":
    main()
