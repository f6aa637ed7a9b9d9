"""Tiny PEFT LoRA adapters for the end-to-end tests, PEFT's own greedy answers to hold the server to, and the
admin API calls that upload adapters."""
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer
from transformers import LlamaForCausalLM

ADMIN_KEY = "test-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@contextmanager
def single_thread() -> Iterator[None]:
    """For the tiny model's math in the test process: threads gain nothing on it, and on two cores shared with
    a server process they mostly wait for each other (ten times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def load_base(model_dir: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@single_thread()
def save_random_adapter(model_dir: Path, directory: Path, seed: int, rank: int = 8,
                        targets: list[str] = ALL_TARGETS, **options: Any) -> Path:
    """A PEFT adapter with both A and B random (init_lora_weights=False), so it changes the model's answers.
    `options` go to LoraConfig (lora_alpha defaults to the rank)."""
    torch.manual_seed(seed)
    options.setdefault("lora_alpha", rank)
    config = LoraConfig(r=rank, target_modules=targets, init_lora_weights=False, **options)
    model = get_peft_model(load_base(model_dir), config)
    with torch.no_grad():  # DoRA starts with magnitudes equal to the adapted weights' norms; training moves them
        for name, parameter in model.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(torch.empty_like(parameter).uniform_(0.5, 1.5))
    model.save_pretrained(directory)
    return directory


@torch.no_grad()
@single_thread()
def greedy(model: torch.nn.Module, prompt_ids: list[int], num_tokens: int) -> list[int]:
    """Argmax decoding that never stops early, as the server does with ignore_eos."""
    ids = torch.tensor([prompt_ids])
    for _ in range(num_tokens):
        next_id = model(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, len(prompt_ids):].tolist()


def peft_model(model_dir: Path, adapter_dir: Path | None) -> torch.nn.Module:
    """PEFT's model with the adapter saved in `adapter_dir`; the plain base model without one."""
    model = load_base(model_dir)
    return model if adapter_dir is None else PeftModel.from_pretrained(model, adapter_dir).eval()


def peft_greedy(model_dir: Path, adapter_dir: Path | None, prompt_ids: list[int], num_tokens: int) -> list[int]:
    return greedy(peft_model(model_dir, adapter_dir), prompt_ids, num_tokens)


def encode(model_dir: Path, text: str) -> list[int]:
    """The prompt's token ids as the server reads the text (BOS first)."""
    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text).ids


def token_texts(model_dir: Path, token_ids: list[int]) -> list[str]:
    """How the OpenAI logprobs show each token."""
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return [tokenizer.decode([token_id], skip_special_tokens=False) for token_id in token_ids]


def upload_files(directory: Path) -> dict[str, tuple[str, bytes]]:
    """The multipart files of an upload of the adapter saved in `directory`."""
    return {file: (file, (directory / file).read_bytes()) for file in ADAPTER_FILES}


def upload(url: str, name: str, directory: Path) -> httpx.Response:
    return httpx.post(f"{url}/v1/adapters", data={"name": name}, files=upload_files(directory), headers=ADMIN,
                      timeout=60)


def delete(url: str, name: str) -> httpx.Response:
    return httpx.delete(f"{url}/v1/adapters/{name}", headers=ADMIN, timeout=60)


def generate_body(text: str, adapter: str | None, num_tokens: int) -> dict:
    """A greedy LoRAX request that runs `num_tokens` tokens whatever they are."""
    return {"inputs": text, "parameters": {"adapter_id": adapter, "max_new_tokens": num_tokens,
                                           "ignore_eos_token": True, "details": True}}


def generated_ids(url: str, text: str, adapter: str | None, num_tokens: int) -> list[int]:
    """The server's greedy token ids, read from LoRAX's details."""
    response = httpx.post(f"{url}/generate", json=generate_body(text, adapter, num_tokens), timeout=60)
    assert response.status_code == 200, response.text
    return [token["id"] for token in response.json()["details"]["tokens"]]
