"""Scoring over HTTP: the prompt's logprobs through OpenAI's echo (the official client), vLLM's prompt_logprobs
(completions and chat) and LoRAX's decoder_input_details (lorax-client), for the base model and two adapters,
each equal to PEFT's log-softmax; and the embedded model's, in float32, equal to transformers'."""
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from lorax import Client

from loraserve.model.embedded import embedded_gguf_path
from tests.api.conftest import ADAPTER_FLAGS, Server, start_server
from tests.api.lora_helpers import ADMIN_KEY, encode, peft_model, save_random_adapter, token_texts, upload

pytestmark = pytest.mark.slow

TEXT = "the quick brown fox jumps over the lazy dog, hello world. paged attention caches keys, hello there"
NAMES = ["scoring-attention", "scoring-everything"]
SETTINGS = [dict(rank=4, targets=["q_proj", "v_proj"]), dict(rank=8)]


@pytest.fixture(scope="module")
def scoring_server(tiny_model_dir, tmp_path_factory) -> Iterator[Server]:
    """The tiny model with prefill chunks of 8 tokens: every scored prompt spans several steps."""
    yield from start_server(tmp_path_factory.mktemp("scoring_server"), *ADAPTER_FLAGS, "--max-num-batched-tokens",
                            "8", model=str(tiny_model_dir), admin_key=ADMIN_KEY)


@pytest.fixture(scope="module")
def adapters(scoring_server, tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("scoring")
    saved = {name: save_random_adapter(tiny_model_dir, directory / name, seed=70 + index, **settings)
             for index, (name, settings) in enumerate(zip(NAMES, SETTINGS))}
    for name, adapter_dir in saved.items():
        assert upload(scoring_server.url, name, adapter_dir).status_code == 201
    return saved


@pytest.fixture(scope="module")
def prompt(tiny_model_dir) -> list[int]:
    return encode(tiny_model_dir, TEXT)


@pytest.fixture(scope="module")
def expected(tiny_model_dir, adapters, prompt) -> dict[str | None, list[float]]:
    """PEFT's logprob of each prompt token after the ones before it (the first has none)."""
    scores = {}
    for name in [None, *NAMES]:
        with torch.no_grad():
            logits = peft_model(tiny_model_dir, adapters[name] if name else None)(torch.tensor([prompt])).logits[0]
        logprobs = logits.double().log_softmax(dim=-1)
        scores[name] = [logprobs[position - 1, prompt[position]].item() for position in range(1, len(prompt))]
    return scores


@pytest.mark.parametrize("name", [None, *NAMES])
def test_echo_with_logprobs_scores_the_prompt_through_the_openai_client(scoring_server, tiny_model_dir, prompt,
                                                                       expected, name) -> None:
    """A plain request first leaves the prompt's blocks in the prefix cache: the scoring request computes them
    again (no cached tokens) and gets PEFT's scores."""
    client = openai.OpenAI(base_url=f"{scoring_server.url}/v1", api_key="unused", max_retries=0)
    client.completions.create(model=name or "", prompt=TEXT, max_tokens=1)
    again = client.completions.create(model=name or "", prompt=TEXT, max_tokens=1)
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    answer = client.completions.create(model=name or "", prompt=TEXT, echo=True, logprobs=2, max_tokens=0)
    logprobs = answer.choices[0].logprobs
    assert answer.choices[0].text == TEXT and answer.choices[0].finish_reason == "length"
    assert logprobs.tokens == token_texts(tiny_model_dir, prompt)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1:] == pytest.approx(expected[name], abs=1e-4)
    assert all(len(top) <= 2 and max(top.values()) >= value
               for top, value in zip(logprobs.top_logprobs[1:], logprobs.token_logprobs[1:]))
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    assert answer.usage.completion_tokens == 0 and answer.usage.prompt_tokens_details.cached_tokens == 0


def test_echo_with_logprobs_and_a_completion_lists_both(scoring_server, tiny_model_dir, prompt, expected) -> None:
    body = {"model": NAMES[0], "prompt": prompt, "echo": True, "logprobs": 0, "max_tokens": 3, "temperature": 0,
            "ignore_eos": True}
    choice = httpx.post(f"{scoring_server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(prompt) + 3
    assert logprobs["token_logprobs"][1:len(prompt)] == pytest.approx(expected[NAMES[0]], abs=1e-4)
    # Offsets index the answer's text: the prompt's tokens spell it (BOS, a special token, takes no room), and
    # the completion's first token starts where it ends.
    offsets, tokens = logprobs["text_offset"], logprobs["tokens"]
    assert [TEXT[offsets[index]:offsets[index + 1]] for index in range(1, len(prompt) - 1)] == tokens[1:len(prompt) - 1]
    assert offsets[0] == offsets[1] == 0 and offsets[len(prompt)] == len(TEXT)
    streamed = httpx.post(f"{scoring_server.url}/v1/completions", json=body | {"stream": True}, timeout=60).text
    chunks = [json.loads(event.removeprefix("data: ")) for event in streamed.split("\n\n")
              if event and event != "data: [DONE]"]
    assert chunks[0]["choices"][0]["text"] == TEXT
    assert chunks[0]["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(expected[NAMES[0]], abs=1e-4)
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == choice["text"]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_vllm_prompt_logprobs(scoring_server, tiny_model_dir, prompt, expected, route) -> None:
    if route == "/v1/completions":
        body, scored = {"prompt": prompt}, prompt
    else:
        body = {"messages": [{"role": "user", "content": TEXT}]}
        scored = None  # the chat template's tokens: checked for shape and self-consistency only
    body |= {"model": NAMES[1], "prompt_logprobs": 2, "max_tokens": 1}
    answer = httpx.post(f"{scoring_server.url}{route}", json=body, timeout=60).json()
    scores = answer["choices"][0]["prompt_logprobs"] if scored else answer["prompt_logprobs"]
    assert scores[0] is None and all(2 <= len(entry) <= 3 for entry in scores[1:])
    for position, entry in enumerate(scores[1:], start=1):
        ranks = sorted(item["rank"] for item in entry.values())
        assert ranks[0] == 1 or len(entry) == 3
        if scored:
            assert entry[str(prompt[position])]["logprob"] == pytest.approx(expected[NAMES[1]][position - 1],
                                                                             abs=1e-4)


def test_lorax_decoder_input_details_carry_the_prompt_logprobs(scoring_server, prompt, expected) -> None:
    lorax = Client(scoring_server.url, timeout=60, max_session_retries=0)
    response = lorax.generate(TEXT, adapter_id=NAMES[1], adapter_source="local", max_new_tokens=2, details=True,
                              decoder_input_details=True)
    prefill = response.details.prefill
    assert [token.id for token in prefill] == prompt
    assert prefill[0].logprob is None
    assert [token.logprob for token in prefill[1:]] == pytest.approx(expected[NAMES[1]], abs=1e-4)


@pytest.fixture(scope="module")
def float32_server(tmp_path_factory) -> Iterator[Server]:
    """The embedded model on the exact float32 path (the default serves its 4-bit codes)."""
    yield from start_server(tmp_path_factory.mktemp("float32"), "--dtype", "float32", "--max-model-len", "512",
                            "--num-kv-blocks", "64", "--max-num-batched-tokens", "48")


def test_the_embedded_models_prompt_logprobs_equal_transformers(float32_server) -> None:
    """Over HTTP, through prefill chunks of 48 tokens and after the prompt went into the prefix cache: each token's
    logprob within 1e-4 of transformers' own float32 forward of the same GGUF file, on the same token ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    prompt = tokenizer.encode(Path("README.md").read_text()[:600])
    assert len(prompt) > 100
    for _ in range(2):  # the prompt's blocks into the prefix cache, then a hit
        plain = httpx.post(f"{float32_server.url}/v1/completions", json={"prompt": prompt, "max_tokens": 1},
                           timeout=120).json()
    assert plain["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    body = {"prompt": prompt, "echo": True, "logprobs": 0, "max_tokens": 0}
    scores = httpx.post(f"{float32_server.url}/v1/completions", json=body, timeout=120).json()
    scores = scores["choices"][0]["logprobs"]["token_logprobs"]
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = model(torch.tensor([prompt])).logits[0].double().log_softmax(dim=-1)
    assert scores[0] is None and len(scores) == len(prompt)
    assert scores[1:] == pytest.approx([logprobs[position - 1, prompt[position]].item()
                                        for position in range(1, len(prompt))], abs=1e-4)
