"""Every adapter kind uploaded over HTTP and served as PEFT serves it: prompt tuning (TEXT and RANDOM init),
prefix tuning (with and without projection), DoRA and rank/alpha patterns, on a tiny random model and (slow) on
the embedded model; kinds not served are refused by name."""
import copy
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer

from loraserve.model.embedded import embedded_gguf_path
from tests.api.conftest import Server, start_server
from tests.api.lora_helpers import (ADAPTER_KINDS, ADMIN_KEY, encode, generated_ids, greedy, peft_model,
                                    save_adapter_of_kind, single_thread, upload)
from tests.api.test_adapter_routes import assert_json_error

PROMPTS = ["the quick brown fox jumps over the lazy dog", "hello"]
NUM_TOKENS = 10


@pytest.fixture(scope="module")
def kinds_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Server]:
    """Every kind resident at once, on 16-token blocks."""
    yield from start_server(tmp_path_factory.mktemp("kinds_server"), "--max-model-len", "128", "--num-kv-blocks",
                            "64", "--max-loras", "8", "--max-lora-rank", "8", model=str(tiny_model_dir),
                            admin_key=ADMIN_KEY)


@pytest.fixture(scope="module")
def kind_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {name: save_adapter_of_kind(tiny_model_dir, tmp_path_factory.mktemp(name), name, 400 + index)
            for index, name in enumerate(ADAPTER_KINDS)}


@pytest.mark.parametrize("name", ADAPTER_KINDS)
def test_each_kind_uploaded_over_http_answers_as_peft(kinds_server, tiny_model_dir, kind_dirs, name):
    response = upload(kinds_server.url, name, kind_dirs[name])
    assert response.status_code == 201, response.text
    settings = ADAPTER_KINDS[name]
    listed = httpx.get(f"{kinds_server.url}/v1/adapters/{name}").json()
    assert listed["kind"] == settings.get("peft_type", "LORA").lower()
    assert listed["num_virtual_tokens"] == settings.get("num_virtual_tokens", 0)
    model = peft_model(tiny_model_dir, kind_dirs[name])
    for text in PROMPTS:
        expected = greedy(model, encode(tiny_model_dir, text), NUM_TOKENS)
        assert generated_ids(kinds_server.url, text, name, NUM_TOKENS) == expected, text
        assert expected != generated_ids(kinds_server.url, text, None, NUM_TOKENS)
    assert_prompt_logprobs_equal_pefts(kinds_server, name, encode(tiny_model_dir, PROMPTS[0]), model)


def assert_prompt_logprobs_equal_pefts(server: Server, name: str | None, prompt: list[int], model: torch.nn.Module
                                       ) -> list[float]:
    """vLLM's prompt_logprobs against PEFT's logits at the prompt's own positions (after any virtual tokens); the
    scores of the prompt's tokens after the first."""
    body = {"model": name or "", "prompt": prompt, "prompt_logprobs": 0, "max_tokens": 1}
    scores = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0][
        "prompt_logprobs"]
    with torch.no_grad(), single_thread():
        logprobs = model(input_ids=torch.tensor([prompt])).logits[0, -len(prompt):].log_softmax(dim=-1)
    assert scores[0] is None and len(scores) == len(prompt)
    for position, entry in enumerate(scores[1:], start=1):
        assert entry[str(prompt[position])]["logprob"] == pytest.approx(
            logprobs[position - 1, prompt[position]].item(), abs=1e-4), position
    return [entry[str(token)]["logprob"] for entry, token in zip(scores[1:], prompt[1:])]


@pytest.mark.parametrize("name", ["prompt-random", "prefix-projection"])
def test_usage_counts_the_prompt_alone_and_repeats_find_the_virtual_tokens_cached(kinds_server, tiny_model_dir,
                                                                                 kind_dirs, name):
    """8 virtual tokens and the prompt's first 8 fill a 16-token block, which a repeat finds in the cache."""
    assert upload(kinds_server.url, f"{name}-usage", kind_dirs[name]).status_code == 201
    body = {"model": f"{name}-usage", "prompt": PROMPTS[0], "max_tokens": 2, "temperature": 0}
    answers = [httpx.post(f"{kinds_server.url}/v1/completions", json=body, timeout=60).json() for _ in range(2)]
    prompt_tokens = len(encode(tiny_model_dir, PROMPTS[0]))
    assert prompt_tokens > 8
    assert [answer["usage"]["prompt_tokens"] for answer in answers] == [prompt_tokens] * 2
    assert [answer["usage"]["prompt_tokens_details"]["cached_tokens"] for answer in answers] == [0, 8]
    assert answers[0]["choices"] == answers[1]["choices"]


def test_the_virtual_tokens_count_against_the_context(kinds_server, kind_dirs):
    assert upload(kinds_server.url, "prompt-context", kind_dirs["prompt-random"]).status_code == 201
    body = {"model": "prompt-context", "prompt": [5] * 100, "max_tokens": 21}  # 8 + 100 + 21 > 128
    response = httpx.post(f"{kinds_server.url}/v1/completions", json=body, timeout=60)
    assert_json_error(response, 400)
    assert "8 virtual tokens" in response.json()["error"]["message"]
    body["max_tokens"] = 20
    assert httpx.post(f"{kinds_server.url}/v1/completions", json=body, timeout=60).status_code == 200


@pytest.mark.parametrize("peft_type", ["IA3", "LOHA", "LOKR", "ADALORA", "P_TUNING"])
def test_kinds_not_served_are_refused_by_name(kinds_server, kind_dirs, tmp_path, peft_type):
    directory = tmp_path / peft_type
    directory.mkdir()
    (directory / "adapter_model.safetensors").write_bytes((kind_dirs["prefix"] / "adapter_model.safetensors")
                                                          .read_bytes())
    (directory / "adapter_config.json").write_text(f'{{"peft_type": "{peft_type}"}}')
    response = upload(kinds_server.url, "refused", directory)
    assert_json_error(response, 400)
    assert peft_type in response.json()["error"]["message"]


@pytest.fixture(scope="module")
def embedded_float32_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The embedded model dequantized to float32: the exact reference path, as transformers loads it."""
    yield from start_server(tmp_path_factory.mktemp("embedded_kinds"), "--dtype", "float32", "--max-model-len",
                            "128", "--num-kv-blocks", "32", admin_key=ADMIN_KEY)


@pytest.fixture(scope="module")
def embedded_base() -> torch.nn.Module:
    from benchmarks.perplexity import load_transformers
    return load_transformers(None)


@pytest.mark.slow
@pytest.mark.parametrize("name", ADAPTER_KINDS)
def test_each_kind_made_on_the_embedded_model_answers_as_peft(embedded_float32_server, embedded_base, tmp_path,
                                                              name):
    path = embedded_gguf_path()
    tokenizer = {"tokenizer_name_or_path": str(path.parent), "tokenizer_kwargs": {"gguf_file": path.name}}
    adapter_dir = save_adapter_of_kind(embedded_base, tmp_path / name, name, 500, tokenizer)
    model = PeftModel.from_pretrained(copy.deepcopy(embedded_base), adapter_dir).eval()
    prompt = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).encode(PROMPTS[0])
    assert upload(embedded_float32_server.url, name, adapter_dir).status_code == 201
    expected = greedy(model, prompt, NUM_TOKENS)
    assert generated_ids(embedded_float32_server.url, PROMPTS[0], name, NUM_TOKENS) == expected
    scores = assert_prompt_logprobs_equal_pefts(embedded_float32_server, name, prompt, model)
    base_scores = assert_prompt_logprobs_equal_pefts(embedded_float32_server, None, prompt, embedded_base)
    assert max(abs(ours - base) for ours, base in zip(scores, base_scores)) > 0.1  # the adapter changes the model
