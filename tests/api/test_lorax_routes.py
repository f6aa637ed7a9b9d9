"""The LoRAX-compatible API through the official `lorax-client`, against a real server."""
import httpx
import pytest
from lorax import Client
from lorax.types import FinishReason

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
CHAT_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server.url, timeout=60, max_session_retries=0)


def test_generate_reports_details_for_every_token(client):
    response = client.generate(PROMPT, max_new_tokens=6, details=True, decoder_input_details=True,
                               return_k_alternatives=2)
    details = response.details
    assert details.finish_reason == FinishReason.Length
    assert details.prompt_tokens == 5 and details.generated_tokens == 6
    assert len(details.tokens) == 6
    assert all(isinstance(token.logprob, float) and token.logprob <= 0 for token in details.tokens)
    assert all(len(token.alternative_tokens) == 2 for token in details.tokens)
    assert "".join(token.text for token in details.tokens) == response.generated_text
    assert [token.id for token in details.prefill] == [504, 3575, 282, 4649, 314]
    assert details.seed is None  # greedy


def test_generate_finish_reasons_name_eos_and_stop_sequences(client):
    eos = client.generate(CHAT_PROMPT, max_new_tokens=20)
    assert "Paris" in eos.generated_text
    assert eos.details.finish_reason == FinishReason.EndOfSequenceToken
    assert eos.details.tokens[-1].special
    stopped = client.generate(PROMPT, max_new_tokens=6, stop_sequences=["."])
    assert stopped.details.finish_reason == FinishReason.StopSequence
    assert "." not in stopped.generated_text


def test_stream_ends_with_the_same_text_as_generate(client):
    whole = client.generate(PROMPT, max_new_tokens=8, return_full_text=True)
    events = list(client.generate_stream(PROMPT, max_new_tokens=8, return_full_text=True))
    assert len(events) == 8
    assert all(event.generated_text is None and event.details is None for event in events[:-1])
    assert events[-1].generated_text == whole.generated_text
    assert events[-1].generated_text.startswith(PROMPT)
    assert events[-1].details.finish_reason == FinishReason.Length
    assert events[-1].details.generated_tokens == 8
    assert [event.token.id for event in events] == [token.id for token in whole.details.tokens]


def test_sampling_reports_its_seed_and_repeats(client):
    first = client.generate(PROMPT, max_new_tokens=6, do_sample=True, seed=11, temperature=0.9)
    second = client.generate(PROMPT, max_new_tokens=6, do_sample=True, seed=11, temperature=0.9)
    assert first.details.seed == 11
    assert first.generated_text == second.generated_text


def test_generate_route_answers_an_object_and_root_a_list(server):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
    single = httpx.post(f"{server.url}/generate", json=body, timeout=60)
    listed = httpx.post(f"{server.url}/", json=body, timeout=60)
    assert single.status_code == listed.status_code == 200
    assert listed.json() == [single.json()]
    streamed = httpx.post(f"{server.url}/generate_stream", json=body, timeout=60)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert "[DONE]" not in streamed.text
