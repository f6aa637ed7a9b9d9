"""Medusa heads trained for a tiny test model the way benchmarks/train_medusa.py trains them for the embedded one:
on the model's own greedy answers to the prompts a test will send (a random model's habits do not carry over to
other prompts), so that their drafts are often, not always, right."""
from pathlib import Path

from benchmarks.train_medusa import Teacher, save_medusa_heads, train_heads, training_pairs
from loraserve.model.loader import LoadedModel



def train_tiny_heads(loaded: LoadedModel, prompts: list[list[int]], directory: Path, num_heads: int = 4,
                     epochs: int = 40, adapter: Path | None = None) -> Path:
    """Heads for the model, or with `adapter` for that adapter's requests (written beside its files, into
    `directory`)."""
    teacher = Teacher(loaded, adapter)
    sequences = teacher.answer(prompts, max_tokens=64)
    states = teacher.hidden_states(sequences)
    inputs, targets = training_pairs(sequences, states, [len(prompt) for prompt in prompts], num_heads)
    weights, biases = train_heads(loaded.model.head_weight.detach(), inputs, targets, num_layers=1, epochs=epochs,
                                  batch_size=64, learning_rate=1e-2)
    return save_medusa_heads(directory, weights, biases)
