"""A LoRA adapter trained (a few seconds on CPU) to answer a fixed phrase gives that phrase through the server,
where the base model does not."""
from pathlib import Path

import httpx
import pytest
import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer

from tests.api.lora_helpers import encode, generated_ids, load_base, peft_greedy, single_thread, upload

pytestmark = pytest.mark.slow

PROMPT = "the quick brown fox"
ANSWER = " hello world"
TRAINING_STEPS = 60


@single_thread()
def train_adapter(model_dir: Path, directory: Path, prompt_ids: list[int], answer_ids: list[int]) -> Path:
    """Fit the adapter to continue `prompt_ids` with `answer_ids` (loss on the answer only)."""
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    model = get_peft_model(load_base(model_dir), config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    input_ids = torch.tensor([prompt_ids + answer_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + answer_ids])
    for _ in range(TRAINING_STEPS):
        model(input_ids=input_ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(directory)
    return directory


def test_trained_adapter_answers_its_phrase(adapter_server, tiny_model_dir, tmp_path):
    prompt_ids = encode(tiny_model_dir, PROMPT)
    answer_ids = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json")).encode(ANSWER,
                                                                                    add_special_tokens=False).ids
    adapter_dir = train_adapter(tiny_model_dir, tmp_path / "trained", prompt_ids, answer_ids)
    assert peft_greedy(tiny_model_dir, adapter_dir, prompt_ids, len(answer_ids)) == answer_ids  # training worked
    assert upload(adapter_server.url, "trained-hello", adapter_dir).status_code == 201
    assert generated_ids(adapter_server.url, PROMPT, "trained-hello", len(answer_ids)) == answer_ids
    assert generated_ids(adapter_server.url, PROMPT, None, len(answer_ids)) != answer_ids
    body = {"model": "trained-hello", "prompt": PROMPT, "max_tokens": len(answer_ids), "temperature": 0}
    completion = httpx.post(f"{adapter_server.url}/v1/completions", json=body, timeout=60).json()
    assert completion["choices"][0]["text"] == ANSWER
