"""Tiny PEFT adapters (LoRA, prompt and prefix tuning) for the end-to-end tests, PEFT's own greedy answers to hold
the server to, and the admin API calls that upload adapters."""
import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from tokenizers import Tokenizer
from transformers import LlamaForCausalLM

ADMIN_KEY = "test-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
OPTIONAL_FILES = ("config.json", "medusa_lm_head.safetensors")  # an adapter's own Medusa heads


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


def fresh_base(base: Path | torch.nn.Module) -> torch.nn.Module:
    """The model saved in `base`, or a copy of `base` itself (PEFT adds its layers in place)."""
    return load_base(base) if isinstance(base, Path) else copy.deepcopy(base)


@single_thread()
def save_random_adapter(base: Path | torch.nn.Module, directory: Path, seed: int, rank: int = 8,
                        targets: list[str] = ALL_TARGETS, **options: Any) -> Path:
    """A PEFT adapter of the model saved in `base` (or of `base` itself) with both A and B random
    (init_lora_weights=False), so it changes the model's answers. `options` go to LoraConfig (lora_alpha defaults
    to the rank)."""
    torch.manual_seed(seed)
    options.setdefault("lora_alpha", rank)
    config = LoraConfig(r=rank, target_modules=targets, init_lora_weights=False, **options)
    model = get_peft_model(fresh_base(base), config)
    with torch.no_grad():  # DoRA starts with magnitudes equal to the adapted weights' norms; training moves them
        for name, parameter in model.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(torch.empty_like(parameter).uniform_(0.5, 1.5))
    model.save_pretrained(directory)
    return directory


# One adapter of each kind served, by name: settings for `save_adapter_of_kind`.
ADAPTER_KINDS: dict[str, dict[str, Any]] = {
    # Virtual-token counts that do and do not fill 4-token blocks.
    "prompt-text": dict(peft_type="PROMPT_TUNING", num_virtual_tokens=6, prompt_tuning_init="TEXT",
                        prompt_tuning_init_text="the quick brown fox jumps"),
    "prompt-random": dict(peft_type="PROMPT_TUNING", num_virtual_tokens=8),
    "prefix": dict(peft_type="PREFIX_TUNING", num_virtual_tokens=5),
    "prefix-projection": dict(peft_type="PREFIX_TUNING", num_virtual_tokens=8, prefix_projection=True,
                              encoder_hidden_size=32),
    "dora": dict(rank=4, lora_alpha=8, use_dora=True, targets=["q_proj", "v_proj", "gate_proj", "down_proj"]),
    "patterns": dict(rank=8, lora_alpha=16, rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 32}),
}


def save_adapter_of_kind(base: Path | torch.nn.Module, directory: Path, name: str, seed: int,
                         tokenizer: dict[str, Any] | None = None) -> Path:
    """The adapter `ADAPTER_KINDS[name]` describes, made by PEFT over the model saved in `base` (or `base` itself);
    `tokenizer` tells PEFT where the tokenizer of TEXT init is (default: `base`'s directory)."""
    settings = dict(ADAPTER_KINDS[name])
    if "peft_type" not in settings:
        return save_random_adapter(base, directory, seed, **settings)
    if settings.get("prompt_tuning_init") == "TEXT":
        settings |= tokenizer or {"tokenizer_name_or_path": str(base)}
    return save_prompt_learning_adapter(base, directory, seed, **settings)


@single_thread()
def save_prompt_learning_adapter(base: Path | torch.nn.Module, directory: Path, seed: int, peft_type: str,
                                 num_virtual_tokens: int, **options: Any) -> Path:
    """A PEFT prompt-tuning or prefix-tuning adapter for a causal LM, as PEFT initialises it (`options` go to its
    config: prompt_tuning_init TEXT with its text, prefix_projection, ...)."""
    torch.manual_seed(seed)
    config_class = {"PROMPT_TUNING": PromptTuningConfig, "PREFIX_TUNING": PrefixTuningConfig}[peft_type]
    config = config_class(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, **options)
    get_peft_model(fresh_base(base), config).save_pretrained(directory)
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
    return {file: (file, (directory / file).read_bytes()) for file in ADAPTER_FILES + OPTIONAL_FILES
            if (directory / file).is_file()}


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
