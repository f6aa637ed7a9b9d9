"""The Hugging Face directory tokenizer against transformers' AutoTokenizer on the same files."""
import json

import pytest
from transformers import AutoTokenizer

from loraserve.model.errors import ChatTemplateError
from loraserve.model.hf_loader import read_tokenizer
from tests.model.helpers import save_tiny_llama

TEXTS = [
    "hello world",
    "the quick brown fox, 1234 times!",
    "  leading spaces\tand\nnewlines ",
    "ünïcödé — 日本語 🙂",
    "<s>hello</s> inline special tokens",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "hello there"}],
    [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello"}, {"role": "user", "content": "the fox?"}],
]


@pytest.fixture(scope="module", params=[True, False], ids=["bos", "no-bos"])
def tokenizer_pair(request, tmp_path_factory):
    directory = save_tiny_llama(tmp_path_factory.mktemp("tokenizer"), bos_post_processor=request.param)
    return read_tokenizer(directory, eos_token_ids=[2]), AutoTokenizer.from_pretrained(directory), request.param


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches(tokenizer_pair, add_special_tokens):
    ours, reference, adds_bos = tokenizer_pair
    for text in TEXTS:
        expected = reference.encode(text, add_special_tokens=add_special_tokens)
        assert ours.encode(text, add_special_tokens=add_special_tokens) == expected, text
    assert (ours.encode("hello")[0] == ours.bos_token_id) == adds_bos


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches(tokenizer_pair, skip_special_tokens):
    ours, reference, _ = tokenizer_pair
    for text in TEXTS:
        ids = reference.encode(text)
        expected = reference.decode(ids, skip_special_tokens=skip_special_tokens)
        assert ours.decode(ids, skip_special_tokens=skip_special_tokens) == expected, text


def test_special_tokens_and_token_text(tokenizer_pair):
    ours, reference, _ = tokenizer_pair
    assert (ours.bos_token_id, ours.eos_token_ids) == (reference.bos_token_id, [reference.eos_token_id])
    assert ours.vocab_size == len(reference)
    assert [ours.is_special(index) for index in range(5)] == [True, True, True, False, False]
    for index in reference.encode(" the fox ü"):
        assert ours.token_text(index) == reference.decode([index])


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches(tokenizer_pair, add_generation_prompt):
    ours, reference, _ = tokenizer_pair
    for messages in CONVERSATIONS:
        expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_raise_exception_is_a_chat_template_error(tokenizer_pair):
    ours, _, _ = tokenizer_pair
    with pytest.raises(ChatTemplateError, match="unknown role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "{}"}])


def test_missing_chat_template_is_a_clear_error(tmp_path):
    directory = save_tiny_llama(tmp_path)
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    del tokenizer_config["chat_template"]
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    with pytest.raises(ChatTemplateError, match="no chat template"):
        read_tokenizer(directory, eos_token_ids=[2]).apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_file_wins_over_tokenizer_config(tmp_path):
    directory = save_tiny_llama(tmp_path)
    (directory / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    tokenizer = read_tokenizer(directory, eos_token_ids=[2])
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "[hi]"


# Qwen's way with tools, cut down: the tools as JSON in a system turn, calls as <tool_call> blocks, results as
# tool turns.
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    "Call tools as <tool_call>{\"name\": <name>, \"arguments\": <args>}</tool_call><|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}"
    "{% for call in message.tool_calls or [] %}<tool_call>\n{\"name\": \"{{ call.function.name }}\", "
    "\"arguments\": {{ call.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_tools_calls_and_results_render_as_transformers_renders_them(tmp_path):
    directory = save_tiny_llama(tmp_path)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": HERMES_TEMPLATE}))
    ours, reference = read_tokenizer(directory, eos_token_ids=[2]), AutoTokenizer.from_pretrained(directory)
    tools = [{"type": "function", "function": {"name": "get_time", "description": "The time",
                                               "parameters": {"type": "object", "properties": {"zone": {
                                                   "type": "string"}}}}}]
    messages = [{"role": "user", "content": "time?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": {"zone": "CET"}}}]},
                {"role": "tool", "content": "12:00", "tool_call_id": "c1"}]
    expected = reference.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages, tools=tools) == expected and '"zone": "CET"' in expected
    assert ours.tool_call_format == "hermes"
    assert read_tokenizer(save_tiny_llama(tmp_path / "plain"), eos_token_ids=[2]).tool_call_format is None
