"""The OpenAI-compatible API through the official `openai` client, against a real server."""
import pytest
from openai import OpenAI

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]
    assert models[0].object == "model"


def test_completion_from_text_and_from_token_ids_agree(client, model):
    from_text = client.completions.create(model=model, prompt="The capital of France is", max_tokens=6,
                                          temperature=0)
    assert from_text.object == "text_completion"
    choice = from_text.choices[0]
    assert choice.text and choice.finish_reason in ("stop", "length")
    assert from_text.usage.prompt_tokens == 5
    assert from_text.usage.completion_tokens <= 6
    assert from_text.usage.total_tokens == from_text.usage.prompt_tokens + from_text.usage.completion_tokens
    token_ids = [504, 3575, 282, 4649, 314]  # "The capital of France is"
    from_ids = client.completions.create(model=model, prompt=token_ids, max_tokens=6, temperature=0)
    assert from_ids.choices[0].text == choice.text


def test_completion_batch_of_prompts_with_echo(client, model):
    response = client.completions.create(model=model, prompt=["One, two,", "Red, green,"], max_tokens=3,
                                         temperature=0, echo=True)
    assert [c.index for c in response.choices] == [0, 1]
    assert response.choices[0].text.startswith("One, two,")
    assert response.choices[1].text.startswith("Red, green,")


def test_chat_answers_the_capital_of_france(client, model):
    response = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=16)
    message = response.choices[0].message
    assert message.role == "assistant"
    assert "Paris" in message.content
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens <= 16


def test_streamed_chat_matches_the_whole_answer(client, model):
    whole = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=16)
    chunks = list(client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=16,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish_reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish_reasons == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_a_repeated_prompt_reports_its_cached_tokens(client, model):
    messages = [{"role": "system", "content": "Answer in one word. " * 8}, *QUESTION]
    first, second = (client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=2)
                     for _ in range(2))
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens_details.cached_tokens < cached < second.usage.prompt_tokens
    assert cached % 16 == 0  # whole blocks of the default --block-size
    assert second.choices[0].message.content == first.choices[0].message.content
    chunks = list(client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=2,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached


def test_streamed_completion_ends_with_length(client, model):
    chunks = list(client.completions.create(model=model, prompt="Count: 1, 2, 3,", max_tokens=5, temperature=0,
                                            stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_n_choices_are_seeded_one_after_another(client, model):
    """Choice i of a request seeded s samples like a single request seeded s + i."""
    prompt = "Once upon a time"
    pair = client.completions.create(model=model, prompt=prompt, max_tokens=8, n=2, seed=7, temperature=1.0)
    again = client.completions.create(model=model, prompt=prompt, max_tokens=8, n=2, seed=7, temperature=1.0)
    next_seed = client.completions.create(model=model, prompt=prompt, max_tokens=8, seed=8, temperature=1.0)
    assert [c.index for c in pair.choices] == [0, 1]
    assert [c.text for c in pair.choices] == [c.text for c in again.choices]
    assert pair.choices[1].text == next_seed.choices[0].text
    assert pair.usage.prompt_tokens == next_seed.usage.prompt_tokens  # the prompt counts once


def test_completion_logprobs_are_well_formed(client, model):
    response = client.completions.create(model=model, prompt="The capital of France is", max_tokens=5,
                                         temperature=0, logprobs=2)
    logprobs = response.choices[0].logprobs
    count = response.usage.completion_tokens
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == count
    assert all(isinstance(value, float) and value <= 0 for value in logprobs.token_logprobs)
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert 1 <= len(top) <= 2
        assert max(top.values()) == pytest.approx(value, abs=1e-4)  # greedy picks the most likely
    assert logprobs.text_offset == sorted(logprobs.text_offset)


def test_chat_top_logprobs_are_well_formed(client, model):
    response = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=6,
                                              logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token
        assert entry.logprob <= 0 and bytes(entry.bytes).decode(errors="replace")
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs),
                                                                reverse=True)
