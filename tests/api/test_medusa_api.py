"""Medusa heads through HTTP: a server started with base heads answers as plain decoding does, an adapter uploaded
with its own heads (LoRAX's layout: config.json and medusa_lm_head.safetensors beside the PEFT files) is listed
with them and answers as PEFT does, and malformed heads in an upload get a 400 naming what is wrong."""
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from benchmarks.train_medusa import save_medusa_heads
from tests.api.conftest import ADAPTER_FLAGS, ADMIN_KEY, Server, start_server
from tests.api.lora_helpers import ADMIN, encode, generated_ids, peft_greedy, save_random_adapter, upload
from tests.model.helpers import tiny_llama_config

NUM_TOKENS = 24
PROMPT = "the quick brown fox"


def save_random_heads(directory: Path, seed: int, num_heads: int = 3, projected: bool = False) -> Path:
    config = tiny_llama_config()
    width, vocab = config.hidden_size, config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    return save_medusa_heads(directory, torch.randn(num_heads, 1, width, width, generator=generator) / width,
                             torch.zeros(num_heads, 1, width),
                             torch.randn(num_heads, vocab, width, generator=generator) if projected else None)


@pytest.fixture(scope="module")
def medusa_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Server]:
    heads = save_random_heads(tmp_path_factory.mktemp("base_heads"), seed=1)
    yield from start_server(tmp_path_factory.mktemp("medusa_server"), *ADAPTER_FLAGS, "--max-adapter-bytes", "1MiB",
                            "--spec-tokens", "3", "--medusa-heads", str(heads),
                            "--no-spec-adaptive",  # random heads: verified only because every draft is
                            model=str(tiny_model_dir),
                            admin_key=ADMIN_KEY)


def draft_tokens(server: Server) -> float:
    return server.metric("loraserve:spec_decode_num_draft_tokens_total")


def test_base_requests_answer_as_plain_decoding(medusa_server, tiny_model_dir):
    before = draft_tokens(medusa_server)
    assert generated_ids(medusa_server.url, PROMPT, None, NUM_TOKENS) == peft_greedy(
        tiny_model_dir, None, encode(tiny_model_dir, PROMPT), NUM_TOKENS)
    assert draft_tokens(medusa_server) > before


@pytest.mark.parametrize("projected", [False, True], ids=["LoRAX layout", "Medusa-1 layout"])
def test_an_adapter_uploaded_with_its_own_heads_is_listed_with_them_and_answers_as_peft(
        medusa_server, tiny_model_dir, tmp_path, projected):
    adapter = save_random_adapter(tiny_model_dir, tmp_path / "adapter", seed=3, rank=4)
    save_random_heads(adapter, seed=4, num_heads=2, projected=projected)
    name = f"with-heads-{projected}"
    response = upload(medusa_server.url, name, adapter)
    assert response.status_code == 201, response.text
    assert response.json()["num_medusa_heads"] == 2
    before = draft_tokens(medusa_server)
    assert generated_ids(medusa_server.url, PROMPT, name, NUM_TOKENS) == peft_greedy(
        tiny_model_dir, adapter, encode(tiny_model_dir, PROMPT), NUM_TOKENS)
    assert draft_tokens(medusa_server) > before


@pytest.mark.parametrize("case, message", [
    ("config alone", "need medusa_lm_head.safetensors"),
    ("another hidden size", "the base model's hidden size"),
])
def test_malformed_heads_in_an_upload_get_a_400_naming_the_problem(medusa_server, tiny_model_dir, tmp_path,
                                                                   case, message):
    adapter = save_random_adapter(tiny_model_dir, tmp_path / "adapter", seed=5, rank=4)
    save_random_heads(adapter, seed=6)
    if case == "config alone":
        (adapter / "medusa_lm_head.safetensors").unlink()
    else:
        save_medusa_heads(adapter, torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8))
    response = upload(medusa_server.url, "malformed-heads", adapter)
    assert response.status_code == 400 and message in response.json()["error"]["message"], response.text
    listing = httpx.get(f"{medusa_server.url}/v1/adapters", headers=ADMIN).json()["data"]
    assert "malformed-heads" not in {entry["id"] for entry in listing}
