"""Tool calls read out of text as it streams: for every way of cutting the text into pieces (as tokens arrive),
the deltas make the same message as the whole text, and that message holds the right calls and content."""
import json
import random

import pytest

from loraserve.api.tool_calls import read_message, reader_for
from loraserve.api.tool_schema import ToolFields
from loraserve.engine.grammar import GrammarCompiler, GrammarSpec
from loraserve.model.hf_loader import read_tokenizer
from loraserve.model.tokenizer import Tokenizer
from tests.model.helpers import save_tiny_llama

REQUIRED = '[{"name":"get_weather","parameters":{"city":"Paris \\"Nord\\"","days":[1,2]}},' \
           ' {"name":"get_time","parameters":{}}]'
HERMES = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n')


def streamed_message(mode: str, text: str, seed: int, name: str | None = None) -> tuple[dict, bool]:
    """The message rebuilt from the deltas of `text` fed in random pieces, and whether the reader saw calls."""
    generator = random.Random(seed)
    reader, deltas, position = reader_for(mode, name), [], 0
    while position < len(text):
        step = generator.randint(1, 6)
        deltas += reader.feed(text[position:position + step])
        position += step
    deltas += reader.finish()
    content = "".join(delta.get("content", "") for delta in deltas)
    calls: dict[int, dict] = {}
    for delta in deltas:
        for part in delta.get("tool_calls", []):
            call = calls.setdefault(part["index"], {"name": None, "arguments": ""})
            if "id" in part:
                assert call["name"] is None and part["id"].startswith("call_")  # opened once
                call["name"] = part["function"]["name"]
            call["arguments"] += part["function"]["arguments"]
    return {"content": content, "calls": [calls[index] for index in sorted(calls)]}, reader.called


@pytest.mark.parametrize("seed", range(20))
def test_the_required_array_streams_each_call_and_its_arguments(seed: int) -> None:
    streamed, called = streamed_message("required", REQUIRED, seed)
    assert called and streamed["content"] == ""
    assert [call["name"] for call in streamed["calls"]] == ["get_weather", "get_time"]
    assert [json.loads(call["arguments"]) for call in streamed["calls"]] == [
        {"city": 'Paris "Nord"', "days": [1, 2]}, {}]
    whole = read_message(reader_for("required"), REQUIRED)
    assert [call["function"]["arguments"] for call in whole["tool_calls"]] == [
        call["arguments"] for call in streamed["calls"]] and whole["content"] is None


@pytest.mark.parametrize("seed", range(20))
def test_hermes_blocks_become_calls_and_the_text_around_them_content(seed: int) -> None:
    streamed, called = streamed_message("auto", HERMES, seed)
    assert called and streamed["content"].strip() == "Let me check."
    assert [(call["name"], json.loads(call["arguments"])) for call in streamed["calls"]] == [
        ("get_weather", {"city": "Oslo"}), ("get_time", {})]
    whole = read_message(reader_for("auto"), HERMES)
    assert whole["content"] == "Let me check." and len(whole["tool_calls"]) == 2


@pytest.mark.parametrize("text", ["No tools needed: 2 < 3 and <tool> is not a call.",
                                  "<tool_call>not json</tool_call> then text", "cut off <tool_cal"])
def test_hermes_text_without_calls_comes_back_whole(text: str) -> None:
    for seed in range(10):
        streamed, called = streamed_message("auto", text, seed)
        assert not called and streamed == {"content": text, "calls": []}
    assert read_message(reader_for("auto"), text) == {"role": "assistant", "content": text}


def test_a_named_call_is_the_whole_text_and_an_empty_one_still_opens() -> None:
    streamed, called = streamed_message("named", '{"city":"Rome"}', 3, name="get_weather")
    assert called and streamed["calls"] == [{"name": "get_weather", "arguments": '{"city":"Rome"}'}]
    assert read_message(reader_for("named", "f"), "")["tool_calls"][0]["function"] == {"name": "f", "arguments": ""}


def test_plain_text_is_content() -> None:
    assert read_message(reader_for("none"), "hello") == {"role": "assistant", "content": "hello"}
    assert streamed_message("none", "hello there", 1) == ({"content": "hello there", "calls": []}, False)


@pytest.fixture(scope="module")
def grammars(tmp_path_factory: pytest.TempPathFactory) -> tuple[GrammarCompiler, Tokenizer]:
    tokenizer = read_tokenizer(save_tiny_llama(tmp_path_factory.mktemp("tool_grammar")), eos_token_ids=[2])
    return GrammarCompiler(tokenizer, tokenizer.vocab_size), tokenizer


def auto_accepts(grammars: tuple[GrammarCompiler, Tokenizer], spec: GrammarSpec, text: str) -> bool:
    compiler, tokenizer = grammars
    matcher = compiler.matcher(spec)
    return all(matcher.consume_token(token) for token in tokenizer.encode(text, add_special_tokens=False))


def test_under_auto_text_is_free_and_a_hermes_block_holds_a_valid_call(grammars) -> None:
    """The grammar `auto` runs under: any text, but a block once opened names a declared function and carries
    arguments its schema accepts; the reader then finds that call."""
    schema = {"type": "object", "properties": {"days": {"type": "integer", "minimum": 1, "maximum": 7}},
              "required": ["days"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "forecast", "parameters": schema}}]
    spec = ToolFields.model_validate({"tools": tools, "tool_choice": "auto"}).tool_grammar_spec()
    call = '<tool_call>\n{"name": "forecast", "arguments": {"days":3}}\n</tool_call>'
    assert auto_accepts(grammars, spec, "No call needed, 2 < 3.") and auto_accepts(grammars, spec, "Sure.\n" + call)
    assert not auto_accepts(grammars, spec, call.replace("3", "9"))  # outside the schema
    assert not auto_accepts(grammars, spec, call.replace("forecast", "weather"))  # not a declared function
    assert read_message(reader_for("auto"), "Sure.\n" + call)["tool_calls"][0]["function"] == {
        "name": "forecast", "arguments": '{"days": 3}'}
