"""Structured output over HTTP: JSON schemas, any JSON object, regexes and choices in every spelling (OpenAI's
response_format, vLLM's guided_* and structured_outputs, LoRAX's response_format), sampled at temperature 1 on the
embedded model and on the tiny model with an adapter: every answer matches; bad grammars get a 400."""
import json
import re

import httpx
import jsonschema
import pytest

from tests.api.lora_helpers import save_random_adapter, upload

pytestmark = pytest.mark.slow

NAME = {"type": "string", "maxLength": 12}
SCHEMAS = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                      "score": {"type": "integer", "minimum": -10, "maximum": 10}},
     "required": ["colour"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"owner": {"type": "object", "properties": {"name": NAME,
                                                                                "admin": {"type": "boolean"}},
                                                "required": ["name", "admin"], "additionalProperties": False},
                                      "note": NAME},
     "required": ["owner"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2, "maxItems": 4},
]
QUESTION = [{"role": "user", "content": "Describe a person in JSON."}]


def chat(url: str, **fields) -> dict:
    body = {"messages": QUESTION, "max_tokens": 120, "temperature": 1.0, "seed": 7, **fields}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_json_schemas_hold_at_temperature_one(server, index) -> None:
    schema = SCHEMAS[index]
    format_ = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    answer = chat(server.url, response_format=format_, n=3)
    for choice in answer["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)


def test_every_spelling_of_a_constraint(server) -> None:
    schema = SCHEMAS[0]
    spellings = [{"guided_json": schema}, {"structured_outputs": {"json": schema}}]
    for fields in spellings:
        jsonschema.validate(json.loads(chat(server.url, **fields)["choices"][0]["message"]["content"]), schema)
    assert isinstance(json.loads(chat(server.url, response_format={"type": "json_object"})["choices"][0]
                                 ["message"]["content"]), dict)
    for fields in ({"guided_regex": "[0-9]{3}-[0-9]{4}"}, {"structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}}):
        assert re.fullmatch("[0-9]{3}-[0-9]{4}", chat(server.url, **fields)["choices"][0]["message"]["content"])
    for fields in ({"guided_choice": ["yes", "no", "maybe"]}, {"structured_outputs": {"choice": ["yes", "no"]}}):
        assert chat(server.url, **fields)["choices"][0]["message"]["content"] in ("yes", "no", "maybe")
    lark = 'start: "(" NUMBER ")"\nNUMBER: /[1-9][0-9]?/'
    assert re.fullmatch(r"\([1-9][0-9]?\)", chat(server.url, guided_grammar=lark)["choices"][0]["message"]["content"])
    body = {"inputs": "A person as JSON:", "parameters": {"max_new_tokens": 120, "do_sample": True, "seed": 3,
                                                          "response_format": {"type": "json_object", "schema": schema}}}
    generated = httpx.post(f"{server.url}/generate", json=body, timeout=120).json()["generated_text"]
    jsonschema.validate(json.loads(generated), schema)


def test_a_streamed_constrained_answer_is_whole(server) -> None:
    body = {"messages": QUESTION, "max_tokens": 120, "temperature": 1.0, "stream": True,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMAS[0]}}}
    events = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120).text.split("\n\n")
    chunks = [json.loads(event.removeprefix("data: ")) for event in events if event and event != "data: [DONE]"]
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks if chunk["choices"])
    jsonschema.validate(json.loads(text), SCHEMAS[0])


def test_an_adapters_constrained_answers_hold(adapter_server, tiny_model_dir, tmp_path) -> None:
    """The tiny random model and its adapter choose almost any token: only the grammar keeps them valid."""
    assert upload(adapter_server.url, "structured", save_random_adapter(tiny_model_dir, tmp_path / "a", seed=40))\
        .status_code == 201
    for model in ("structured", None):
        for schema in SCHEMAS:
            format_ = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
            answer = chat(adapter_server.url, response_format=format_, n=2, model=model, max_tokens=150)
            for choice in answer["choices"]:
                jsonschema.validate(json.loads(choice["message"]["content"]), schema)


@pytest.mark.parametrize("fields", [
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
    {"response_format": {"type": "json_schema"}},
    {"guided_regex": "[a-z"},
    {"guided_regex": "[a-z]+", "guided_choice": ["a"]},
    {"response_format": {"type": "json_object"}, "ignore_eos": True},
    {"response_format": {"type": "yaml"}},
], ids=["bad schema", "no schema", "bad regex", "two constraints", "ignore_eos", "unknown type"])
def test_grammars_that_cannot_run_are_refused(server, fields) -> None:
    body = {"messages": QUESTION, "max_tokens": 8, **fields}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"]
