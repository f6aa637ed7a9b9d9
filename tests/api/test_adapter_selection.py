"""Choosing an adapter per request: with one, the server's greedy answer is PEFT's, token for token, in both
APIs and through both official clients."""
import json
from pathlib import Path

import httpx
import openai
import pytest
from lorax import Client

from tests.api.lora_helpers import encode, generated_ids, peft_greedy, save_random_adapter, token_texts, upload

pytestmark = pytest.mark.slow

PROMPTS = ["the quick brown fox", "hello world, hello there", "paged attention caches keys", "magnitude and direction"]
NAMES = [f"select-{index}" for index in range(len(PROMPTS))]
NUM_TOKENS = 12


@pytest.fixture(scope="module")
def adapters(adapter_server, tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Four random adapters, uploaded: two plain, one with PEFT's per-module rank and alpha patterns, one DoRA."""
    directory = tmp_path_factory.mktemp("selection")
    options = [{}, {}, dict(rank_pattern={"q_proj": 4, "down_proj": 16}, alpha_pattern={"v_proj": 32}),
               dict(use_dora=True, targets=["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"])]
    saved = {name: save_random_adapter(tiny_model_dir, directory / name, seed=seed, **options[seed])
             for seed, name in enumerate(NAMES)}
    for name, adapter_dir in saved.items():
        response = upload(adapter_server.url, name, adapter_dir)
        assert response.status_code == 201, response.text
    return saved


@pytest.fixture(scope="module")
def base_name(adapter_server) -> str:
    return httpx.get(f"{adapter_server.url}/v1/models").json()["data"][0]["id"]


def completion(url: str, model: str | None, prompt: list[int], stream: bool = False) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": NUM_TOKENS, "temperature": 0, "ignore_eos": True,
            "logprobs": 0, "stream": stream}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


@pytest.mark.parametrize("name, text", zip(NAMES, PROMPTS))
def test_adapter_answers_are_pefts(adapter_server, tiny_model_dir, adapters, name, text):
    prompt = encode(tiny_model_dir, text)
    expected = peft_greedy(tiny_model_dir, adapters[name], prompt, NUM_TOKENS)
    assert expected != peft_greedy(tiny_model_dir, None, prompt, NUM_TOKENS)
    assert generated_ids(adapter_server.url, text, name, NUM_TOKENS) == expected
    answer = completion(adapter_server.url, name, prompt).json()
    assert answer["model"] == name
    assert answer["choices"][0]["logprobs"]["tokens"] == token_texts(tiny_model_dir, expected)


def test_no_adapter_means_the_base_model(adapter_server, tiny_model_dir, adapters, base_name):
    prompt = encode(tiny_model_dir, PROMPTS[0])
    expected = token_texts(tiny_model_dir, peft_greedy(tiny_model_dir, None, prompt, NUM_TOKENS))
    for model in (None, "", base_name):
        answer = completion(adapter_server.url, model, prompt).json()
        assert answer["choices"][0]["logprobs"]["tokens"] == expected
        assert answer["model"] == base_name
    assert generated_ids(adapter_server.url, PROMPTS[0], None, NUM_TOKENS) == \
        peft_greedy(tiny_model_dir, None, prompt, NUM_TOKENS)


def test_streams_and_chats_use_the_adapter(adapter_server, tiny_model_dir, adapters):
    prompt = encode(tiny_model_dir, PROMPTS[1])
    whole = completion(adapter_server.url, NAMES[1], prompt).json()["choices"][0]["text"]
    events = completion(adapter_server.url, NAMES[1], prompt, stream=True).text.split("\n\n")
    chunks = [json.loads(event.removeprefix("data: ")) for event in events if event and event != "data: [DONE]"]
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == whole
    assert {chunk["model"] for chunk in chunks} == {NAMES[1]}
    messages = [{"role": "user", "content": "hello"}]
    chats = [httpx.post(f"{adapter_server.url}/v1/chat/completions", timeout=60,
                        json={"model": model, "messages": messages, "max_tokens": 8, "temperature": 0}).json()
             for model in (NAMES[1], NAMES[2])]
    assert [chat["model"] for chat in chats] == [NAMES[1], NAMES[2]]


def test_models_lists_adapters_under_the_base(adapter_server, adapters, base_name):
    models = httpx.get(f"{adapter_server.url}/v1/models").json()["data"]
    assert models[0]["id"] == base_name and models[0]["parent"] is None
    parents = {model["id"]: model["parent"] for model in models[1:]}
    assert all(parents.get(name) == base_name for name in NAMES)


def test_official_clients_select_adapters(adapter_server, tiny_model_dir, adapters):
    text, name = PROMPTS[2], NAMES[2]
    prompt = encode(tiny_model_dir, text)
    expected = peft_greedy(tiny_model_dir, adapters[name], prompt, NUM_TOKENS)
    client = openai.OpenAI(base_url=f"{adapter_server.url}/v1", api_key="unused", max_retries=0)
    answer = client.completions.create(model=name, prompt=prompt, max_tokens=NUM_TOKENS, temperature=0, logprobs=0,
                                       extra_body={"ignore_eos": True})
    assert answer.model == name
    assert answer.choices[0].logprobs.tokens == token_texts(tiny_model_dir, expected)
    lorax = Client(adapter_server.url, timeout=60, max_session_retries=0)
    response = lorax.generate(text, adapter_id=name, adapter_source="local", max_new_tokens=NUM_TOKENS,
                              ignore_eos_token=True, details=True)
    assert [token.id for token in response.details.tokens] == expected


def test_unknown_adapters_are_404_in_each_shape(adapter_server, tiny_model_dir):
    prompt = encode(tiny_model_dir, PROMPTS[0])
    answer = completion(adapter_server.url, "never-uploaded", prompt)
    assert answer.status_code == 404
    assert answer.json()["error"]["param"] == "model"
    response = httpx.post(f"{adapter_server.url}/generate", timeout=60,
                          json={"inputs": "hello", "parameters": {"adapter_id": "org/never-uploaded"}})
    assert response.status_code == 404
    assert response.json()["error_type"] == "not_found"


@pytest.mark.parametrize("source, message", [("hub", "no adapter source 'hub'"), ("pbase", "no adapter source 'pbase'"),
                                             ("s3", "takes an s3:// URL")])
def test_adapter_sources_this_server_cannot_read_are_refused(adapter_server, adapters, source, message):
    body = {"inputs": "hello", "parameters": {"adapter_id": NAMES[0], "adapter_source": source}}
    response = httpx.post(f"{adapter_server.url}/generate", json=body, timeout=60)
    assert response.status_code == 422
    assert response.json()["error_type"] == "validation"
    assert message in response.json()["error"]
