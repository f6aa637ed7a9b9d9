"""Trains Medusa heads for a model by self-distillation: the model answers instructions, and each head learns to
guess, from the model's final hidden state at a position, the token the model itself wrote k + 1 places later.

Usage: python -m benchmarks.train_medusa [--heads 4] [--layers 1] [--instructions 768] [--max-tokens 192]
                                         [--epochs 6] [--adapter DIR] [--own-projections] [--device auto]
                                         [--out benchmarks/out]
Writes <out>/medusa-heads/{config.json, medusa_lm_head.safetensors} (with --adapter DIR, heads for that adapter's
requests, into DIR beside its PEFT files) in the layout LoRAX reads (residual blocks only, the base model's head
as each head's projection; `--own-projections` writes Medusa-1's layout, each head with a copy of the base head),
ready for `loraserve serve --medusa-heads <dir> --spec-tokens N`. The base head stays frozen, so training moves a
few small matrices, with the softmax over the tokens the answers use. On a 2-core CPU for the embedded model,
768 instructions take about 12 minutes (8 answering them, 4 training). The answers are the model's greedy ones,
as the benchmark asks for; none of the benchmark's questions is among the instructions. Progress goes to stderr.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from benchmarks.embedded import add_device_and_out, load_embedded
from loraserve.adapters.records import AdapterRef
from loraserve.config import ServerConfig
from loraserve.engine.engine import LLMEngine
from loraserve.engine.sampling_params import SamplingParams
from loraserve.model.loader import LoadedModel
from loraserve.model.medusa import medusa_logits

TOPICS = ["the water cycle", "photosynthesis", "volcanoes", "the moon", "electricity", "the printing press",
          "coffee", "chess", "rainbows", "steam trains", "coral reefs", "honey bees", "clouds", "earthquakes",
          "public libraries", "the human heart", "glaciers", "the Roman empire", "solar panels", "owls",
          "bread making", "the piano", "deserts", "vaccines", "the first airplanes", "recycling", "tea",
          "mountain climbing", "the stock market", "dinosaurs", "the Olympic games", "bridges", "penguins",
          "the Great Wall of China", "hurricanes", "chocolate", "the immune system", "black holes", "gardening",
          "the violin", "ancient Egypt", "wind turbines", "sleep", "the human brain", "rainforests", "the bicycle",
          "cheese making", "comets", "the telephone", "sharks", "jazz music", "the Renaissance", "composting",
          "the Moon landing", "tigers", "maps", "the periodic table", "lighthouses", "snow", "windmills", "bats",
          "the Sahara", "origami", "the Eiffel Tower", "submarines", "mushrooms", "the alphabet", "fireworks",
          "elephants", "the Amazon river", "batteries", "the camera", "pirates", "tides", "friendship",
          "robots", "time zones", "castles", "the compass", "migrating birds", "yoga", "the water wheel",
          "the solar system", "the first computers", "money", "volunteering", "the seasons", "kites",
          "the Arctic", "ants", "the guitar"]
FORMS = ["Explain {} to a ten-year-old.", "Write a short paragraph about {}.",
         "What are three interesting facts about {}?", "Write a short story in which {} matter.",
         "Describe the history of {} in a few sentences.", "What are the advantages and disadvantages of {}?",
         "Write a short poem about {}.", "Give me some tips related to {}.", "Why do people care about {}?",
         "Write a diary entry by someone who loves {}.", "Compare {} with something similar.",
         "What would the world be like without {}?", "Summarise what a beginner should know about {}.",
         "Write a dialogue between two friends about {}.", "List some common myths about {}.",
         "How might {} change in the next fifty years?"]


def instructions(count: int) -> list[str]:
    """`count` instructions, every topic in each form before the next form."""
    return [form.format(topic) for form in FORMS for topic in TOPICS][:count]


class Teacher:
    """The model that answers and whose hidden states the heads read: the base model, or the base with an adapter
    when the heads are for that adapter (uploaded beside its PEFT files, its requests draft with them)."""

    def __init__(self, loaded: LoadedModel, adapter: Path | None = None) -> None:
        self.model = loaded.model
        self.engine = LLMEngine(loaded, ServerConfig(max_num_seqs=16, kv_cache_memory=256 << 20,
                                                     max_num_batched_tokens=4096, prefix_caching=False))
        self.adapter = None if adapter is None else self.engine.adapters.add_from_path("teacher", adapter).name

    def _adapters(self, count: int) -> list[AdapterRef | None]:
        return [None if self.adapter is None else self.engine.adapters.resolve(self.adapter) for _ in range(count)]

    def answer(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        """Each prompt followed by the greedy answer."""
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        answers = []
        for start in range(0, len(prompts), 16):
            group = prompts[start:start + 16]
            answers += self.engine.generate(group, params, self._adapters(len(group)))
            print(f"\r  answered {start + len(group)}/{len(prompts)}", end="", file=sys.stderr)
        print(file=sys.stderr)
        return [prompt + answer for prompt, answer in zip(prompts, answers)]

    @torch.inference_mode()
    def hidden_states(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """The final hidden state at every position of each sequence, as the engine computes it (one prefill each,
        read off the final norm; a prompt-tuning adapter's virtual tokens come first and are left out)."""
        captured: list[torch.Tensor] = []
        hook = self.model.norm.register_forward_hook(lambda module, inputs, output: captured.append(output.float()))
        states = []
        try:
            for tokens in sequences:
                captured.clear()
                self.engine.generate([tokens], SamplingParams(temperature=0.0, max_tokens=1), self._adapters(1))
                states.append(torch.cat(captured)[-len(tokens):])
        finally:
            hook.remove()
        return states


def training_pairs(sequences: list[list[int]], states: list[torch.Tensor], num_prompt_tokens: list[int],
                   num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden [n, hidden], targets [n, heads]): from the last prompt position on, the token each head should
    guess there (head k: k + 2 places ahead), -100 past the end."""
    inputs, targets = [], []
    for tokens, hidden, prompt_length in zip(sequences, states, num_prompt_tokens):
        positions = range(prompt_length - 1, len(tokens) - 2)
        inputs.append(hidden[prompt_length - 1:len(tokens) - 2])
        targets.append(torch.tensor([[tokens[position + 2 + head] if position + 2 + head < len(tokens) else -100
                                      for head in range(num_heads)] for position in positions]))
    return torch.cat(inputs), torch.cat(targets)


def train_heads(head_weight: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, num_layers: int,
                epochs: int, batch_size: int = 256, learning_rate: float = 1e-3, seed: int = 0,
                vocabulary: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks' weights [heads, layers, hidden, hidden] and biases [heads, layers, hidden] minimising each head's
    cross-entropy through the frozen `head_weight` [vocab, hidden]. Starting from zero, each head begins as the
    model's own next-token guess. With `vocabulary` (token ids) the softmax runs over those tokens alone, which
    must hold every target: the head's rows are most of the cost, and a model's answers use a few thousand."""
    num_heads, width = targets.shape[1], inputs.shape[1]
    if vocabulary is not None:
        head_weight = head_weight[vocabulary]
        position = torch.full((int(vocabulary.max()) + 1,), -100, dtype=torch.int64)
        position[vocabulary] = torch.arange(len(vocabulary))
        targets = torch.where(targets >= 0, position[targets.clamp(min=0)], -100)
        assert bool((targets[targets >= 0] >= 0).all()), "every target must be in the vocabulary"
    weights = torch.zeros(num_heads, num_layers, width, width, requires_grad=True)
    biases = torch.zeros(num_heads, num_layers, width, requires_grad=True)
    optimizer = torch.optim.AdamW([weights, biases], lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(inputs) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps)
    head_weight = head_weight.float()
    started, step = time.monotonic(), 0
    for epoch in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        total, count = 0.0, 0
        for start in range(0, len(inputs), batch_size):
            batch = order[start:start + batch_size]
            states = inputs[batch].unsqueeze(0).expand(num_heads, -1, -1)
            for layer in range(num_layers):
                states = states + F.silu(torch.baddbmm(biases[:, layer, None, :], states,
                                                       weights[:, layer].transpose(1, 2)))
            logits = states @ head_weight.T  # [heads, batch, vocab]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[batch].T.reshape(-1),
                                   ignore_index=-100)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total, count, step = total + loss.item(), count + 1, step + 1
            print(f"\r  epoch {epoch + 1}/{epochs}: step {step}/{steps}, loss {total / count:.3f}, "
                  f"{time.monotonic() - started:.0f} s", end="", file=sys.stderr)
        print(file=sys.stderr)
    return weights.detach(), biases.detach()


def head_accuracy(head_weight: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor, inputs: torch.Tensor,
                  targets: torch.Tensor) -> list[float]:
    """How often each head's top token is its target."""
    with torch.inference_mode():
        guesses = torch.cat([medusa_logits(inputs[start:start + 512], weights, biases, None,
                                           lambda states: states @ head_weight.float().T).argmax(dim=-1)
                             for start in range(0, len(inputs), 512)])
    valid = targets != -100
    return (((guesses == targets) & valid).sum(dim=0) / valid.sum(dim=0)).tolist()


def save_medusa_heads(directory: Path, weights: torch.Tensor, biases: torch.Tensor,
                      projections: torch.Tensor | None = None, base_model: str = "") -> Path:
    """Write heads as Medusa and LoRAX read them: config.json and medusa_lm_head.safetensors."""
    directory.mkdir(parents=True, exist_ok=True)
    num_heads, num_layers = weights.shape[:2]
    tensors = {}
    for head in range(num_heads):
        for layer in range(num_layers):
            tensors[f"{head}.{layer}.linear.weight"] = weights[head, layer].contiguous()
            tensors[f"{head}.{layer}.linear.bias"] = biases[head, layer].contiguous()
        if projections is not None:
            tensors[f"{head}.{num_layers}.weight"] = projections[head].contiguous()
    save_file(tensors, directory / "medusa_lm_head.safetensors")
    config = {"medusa_num_heads": num_heads, "medusa_num_layers": num_layers, "base_model_name_or_path": base_model}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def chat_prompt(loaded: LoadedModel, message: str) -> list[int]:
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": message}])
    return loaded.tokenizer.encode(text, add_special_tokens=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--instructions", type=int, default=768, help=f"instructions answered (at most "
                        f"{len(TOPICS) * len(FORMS)}): more generalise better, and take longer")
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--full-vocabulary", action="store_true", help="train over the whole vocabulary, not only "
                        "the tokens of the prompts and answers (ten times slower)")
    parser.add_argument("--own-projections", action="store_true", help="Medusa-1's layout: each head a copy of "
                        "the base head")
    parser.add_argument("--adapter", type=Path, help="train heads for this adapter (a PEFT directory): written "
                        "beside its files, ready to upload with it")
    add_device_and_out(parser)
    args = parser.parse_args()
    loaded = load_embedded(args)
    prompts = [chat_prompt(loaded, message) for message in instructions(args.instructions)]
    print(f"answering {len(prompts)} instructions...", file=sys.stderr)
    teacher = Teacher(loaded, args.adapter)
    sequences = teacher.answer(prompts, args.max_tokens)
    print("reading hidden states...", file=sys.stderr)
    states = teacher.hidden_states(sequences)
    inputs, targets = training_pairs(sequences, states, [len(prompt) for prompt in prompts], args.heads)
    held_out = len(inputs) // 10
    print(f"training {args.heads} heads on {len(inputs) - held_out} positions...", file=sys.stderr)
    head_weight = loaded.model.head_weight.detach()
    vocabulary = None if args.full_vocabulary else torch.tensor(sorted({token for tokens in sequences
                                                                         for token in tokens}))
    weights, biases = train_heads(head_weight, inputs[held_out:], targets[held_out:], args.layers, args.epochs,
                                  learning_rate=args.learning_rate, vocabulary=vocabulary)
    accuracy = head_accuracy(head_weight, weights, biases, inputs[:held_out], targets[:held_out])
    print("held-out top-1 accuracy per head: " + " ".join(f"{value:.2f}" for value in accuracy))
    projections = head_weight.float().expand(args.heads, -1, -1) if args.own_projections else None
    directory = save_medusa_heads(args.adapter or args.out / "medusa-heads", weights, biases, projections, loaded.name)
    print(f"wrote {directory}")


if __name__ == "__main__":
    main()
