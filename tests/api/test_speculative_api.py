"""Speculative decoding through HTTP on the embedded model: prompt lookup changes no greedy answer, its counters
add up, and a request can turn it off."""
import json
from collections.abc import Iterator

import httpx
import pytest

from tests.api.conftest import MAIN_FLAGS, Server, start_server

pytestmark = pytest.mark.slow

# Text the model is asked to copy, so prompt lookup's drafts are mostly right.
PASSAGE = ("The lighthouse keeper climbed the stairs every evening at dusk. He trimmed the wick, polished the lens, "
           "and wrote the weather in his logbook before the lamp was lit.")
COPY_PROMPT = f"Repeat this text exactly.\nText: {PASSAGE}\nRepeated text: {PASSAGE[:40]}"
SPEC_TOKENS = 4


@pytest.fixture(scope="module")
def spec_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from start_server(tmp_path_factory.mktemp("spec_server"), *MAIN_FLAGS, "--spec-tokens", str(SPEC_TOKENS))


def completion(server: Server, prompt: str, **options) -> dict:
    body = {"prompt": prompt, "max_tokens": 48, "temperature": 0, "ignore_eos": True, **options}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def lorax_tokens(server: Server, prompt: str, **parameters) -> list[int]:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 32, "details": True, **parameters}}
    response = httpx.post(f"{server.url}/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return [token["id"] for token in response.json()["details"]["tokens"]]


def spec_counters(server: Server) -> dict[str, float]:
    names = ("drafts", "draft_tokens", "accepted_tokens")
    counters = {name: server.metric(f"loraserve:spec_decode_num_{name}_total") for name in names}
    for position in range(SPEC_TOKENS):
        counters[f"position {position}"] = server.metric("loraserve:spec_decode_num_accepted_tokens_per_pos_total",
                                                         position=str(position))
    return counters


def growth(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in after}


@pytest.mark.parametrize("prompt", [COPY_PROMPT, "Write a short poem about autumn leaves."])
def test_greedy_answers_equal_the_plain_server(server, spec_server, prompt):
    assert completion(spec_server, prompt) == completion(server, prompt)
    stop = completion(server, prompt)["text"][20:26]
    assert completion(spec_server, prompt, stop=[stop]) == completion(server, prompt, stop=[stop])


def test_info_reports_the_draft_length(server, spec_server):
    assert httpx.get(f"{spec_server.url}/info").json()["speculate"] == SPEC_TOKENS
    assert httpx.get(f"{server.url}/info").json()["speculate"] == 0


def test_draft_counters_add_up(spec_server):
    before = spec_counters(spec_server)
    answer = completion(spec_server, COPY_PROMPT)
    assert PASSAGE[40:80] in answer["text"]  # the model copies, so drafts are accepted
    counts = growth(spec_counters(spec_server), before)
    assert 0 < counts["accepted_tokens"] <= counts["draft_tokens"] <= SPEC_TOKENS * counts["drafts"]
    per_position = [counts[f"position {position}"] for position in range(SPEC_TOKENS)]
    assert sum(per_position) == counts["accepted_tokens"]
    assert per_position == sorted(per_position, reverse=True)  # a draft is kept only after all before it


def test_a_request_can_turn_speculation_off(server, spec_server):
    before = spec_counters(spec_server)
    plain = completion(server, COPY_PROMPT)
    assert completion(spec_server, COPY_PROMPT, speculative=False) == plain
    assert lorax_tokens(spec_server, COPY_PROMPT, speculative=False) == lorax_tokens(server, COPY_PROMPT)
    assert growth(spec_counters(spec_server), before)["drafts"] == 0
    assert lorax_tokens(spec_server, COPY_PROMPT) == lorax_tokens(server, COPY_PROMPT)
    assert growth(spec_counters(spec_server), before)["drafts"] > 0


def test_a_server_with_a_draft_model_proposes_with_it(tiny_model_dir, tmp_path):
    """The target as its own draft: every greedy draft is accepted."""
    for server in start_server(tmp_path, "--max-model-len", "128", "--num-kv-blocks", "64", "--spec-tokens", "3",
                               "--draft-model", str(tiny_model_dir), model=str(tiny_model_dir)):
        answer = completion(server, [5, 6, 7, 8], max_tokens=20)
        assert answer["finish_reason"] == "length"
        counts = spec_counters(server)
        assert counts["draft_tokens"] > 0 and counts["accepted_tokens"] == counts["draft_tokens"]


def test_streams_carry_every_token_of_a_multi_token_step(server, spec_server):
    """LoRAX streams one event per token, OpenAI one chunk per step: both add up to the plain server's answer."""
    body = {"inputs": COPY_PROMPT, "parameters": {"max_new_tokens": 32}}
    with httpx.stream("POST", f"{spec_server.url}/generate_stream", json=body, timeout=120) as response:
        events = [json.loads(line[len("data:"):]) for line in response.iter_lines() if line.startswith("data:")]
    assert [event["token"]["id"] for event in events] == lorax_tokens(server, COPY_PROMPT)
    body = {"prompt": COPY_PROMPT, "max_tokens": 48, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{spec_server.url}/v1/completions", json=body, timeout=120) as response:
        chunks = [line[len("data:"):].strip() for line in response.iter_lines() if line.startswith("data:")]
    assert chunks[-1] == "[DONE]"
    streamed = "".join(json.loads(chunk)["choices"][0]["text"] for chunk in chunks[:-1])
    assert streamed == completion(server, COPY_PROMPT)["text"]
    assert len(chunks) - 1 < 48  # fewer chunks than tokens: several tokens came in one step
