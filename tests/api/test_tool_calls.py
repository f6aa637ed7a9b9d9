"""Tool calling over HTTP with the official clients: a named function or `required` forces calls whose arguments
validate against their schemas (embedded model, and the tiny model with an adapter, sampled at temperature 1),
streamed as OpenAI's tool-call deltas that rebuild the same calls; earlier calls and their results go back through
the chat template; `auto` renders the tools for a template that shows them and is refused for one that does not;
contradictory tool fields get a 400 naming the field. instructor and LangChain run against the server."""
import json
import shutil
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from tests.api.conftest import MAIN_FLAGS, Server, start_server
from tests.api.lora_helpers import save_random_adapter, upload

pytestmark = pytest.mark.slow

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
QUESTION = [{"role": "user", "content": "What is the weather in Paris for the next three days?"}]
# A template that shows the model its tools and asks for Hermes-style calls, as Qwen's does.
TOOL_TEMPLATE = (
    "{% if tools %}<|system|>\nTools:\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>{{ eos_token }}\n{% endif %}"
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def base_model(server: Server) -> str:
    return httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]


def check_calls(message, names: set[str]) -> list[str]:
    """Each call's arguments validate against its function's schema; returns the functions called."""
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return [call.function.name for call in message.tool_calls]


def test_a_named_function_is_called_with_valid_arguments(server) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    answer = client(server).chat.completions.create(model=base_model(server), messages=QUESTION, tools=TOOLS,
                                                    tool_choice=choice, temperature=1.0, seed=1, n=3, max_tokens=60)
    for option in answer.choices:
        assert option.finish_reason == "tool_calls" and option.message.content is None
        assert check_calls(option.message, {"get_weather"}) == ["get_weather"]


@pytest.mark.parametrize("parallel, temperature", [(False, 1.0), (True, 0.0)])
def test_required_makes_one_or_more_calls_among_the_tools(server, parallel: bool, temperature: float) -> None:
    """Without parallel calls, exactly one. (With them, this small model sampled at temperature 1 sometimes goes
    on adding calls until max_tokens, as its grammar allows: greedy here.)"""
    answer = client(server).chat.completions.create(model=base_model(server), messages=QUESTION, tools=TOOLS,
                                                    tool_choice="required", parallel_tool_calls=parallel,
                                                    temperature=temperature, seed=2, n=4, max_tokens=120)
    for option in answer.choices:
        assert option.finish_reason == "tool_calls"
        called = check_calls(option.message, set(SCHEMAS))
        assert len(called) == 1 or parallel


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_streamed_calls_rebuild_the_whole_answers_calls(server, tool_choice) -> None:
    """The same seed streamed and not: the deltas (an opening with id and name, then argument pieces) add up to
    the calls of the whole answer."""
    settings = dict(model=base_model(server), messages=QUESTION, tools=TOOLS, tool_choice=tool_choice,
                    parallel_tool_calls=False, temperature=1.0, seed=5, max_tokens=120)
    whole = client(server).chat.completions.create(**settings).choices[0]
    calls: dict[int, dict] = {}
    finish_reason = None
    for chunk in client(server).chat.completions.create(**settings, stream=True):
        for choice in chunk.choices:
            finish_reason = choice.finish_reason or finish_reason
            for part in choice.delta.tool_calls or []:
                if part.id is not None:
                    assert part.index not in calls
                    calls[part.index] = {"name": part.function.name, "arguments": ""}
                calls[part.index]["arguments"] += part.function.arguments or ""
    assert finish_reason == whole.finish_reason == "tool_calls"
    assert [calls[index] for index in sorted(calls)] == [
        {"name": call.function.name, "arguments": call.function.arguments} for call in whole.message.tool_calls]


def test_calls_and_their_results_go_back_through_the_template(server) -> None:
    turn = client(server).chat.completions.create(model=base_model(server), messages=QUESTION, tools=TOOLS,
                                                  tool_choice="required", parallel_tool_calls=False, max_tokens=60,
                                                  temperature=0)
    call = turn.choices[0].message.tool_calls[0]
    conversation = QUESTION + [turn.choices[0].message.model_dump(exclude_none=True),
                               {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 degrees."}]
    answer = client(server).chat.completions.create(model=base_model(server), messages=conversation, tools=TOOLS,
                                                    tool_choice="none", max_tokens=8, temperature=0)
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].message.content
    assert answer.usage.prompt_tokens > turn.usage.prompt_tokens


def test_an_adapters_calls_hold(adapter_server, tiny_model_dir, tmp_path) -> None:
    """The tiny random model with an adapter writes almost any token: only the grammar keeps its calls valid."""
    assert upload(adapter_server.url, "caller", save_random_adapter(tiny_model_dir, tmp_path / "a", seed=41))\
        .status_code == 201
    for model in ("caller", base_model(adapter_server)):
        for tool_choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            answer = client(adapter_server).chat.completions.create(
                model=model, messages=QUESTION, tools=TOOLS, tool_choice=tool_choice, temperature=1.0, seed=3, n=2,
                max_tokens=150)
            for option in answer.choices:
                check_calls(option.message, set(SCHEMAS))


@pytest.mark.parametrize("fields, field", [
    ({"tools": TOOLS}, "tool_choice"),  # auto, the default with tools, on a template that shows no tools
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": TOOLS + TOOLS[:1], "tool_choice": "required"}, "name of its own"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "one kind"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "name"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "tool_call_id"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                         "function": {"name": "f", "arguments": "{"}}]}]}, "JSON"),
], ids=["auto without template support", "unknown function", "no tools", "duplicate names", "two constraints",
        "bad name", "tool message without id", "arguments not JSON"])
def test_tool_fields_that_cannot_be_honoured_are_refused(server, fields, field) -> None:
    body = {"messages": QUESTION, "max_tokens": 8, **fields}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert field in response.json()["error"]["message"] + str(response.json()["error"].get("param"))


def test_completions_refuse_tools(server) -> None:
    body = {"prompt": "hi", "max_tokens": 4, "tools": TOOLS}
    assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 400


@pytest.fixture(scope="module")
def tool_template_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir) -> Iterator[Server]:
    """The tiny model with a chat template that shows its tools and asks for Hermes calls."""
    directory = tmp_path_factory.mktemp("tool_template")
    model_dir = shutil.copytree(tiny_model_dir, directory / "model")
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": TOOL_TEMPLATE}))
    yield from start_server(directory, *MAIN_FLAGS, model=str(model_dir))


def test_auto_shows_the_tools_to_a_template_that_renders_them(tool_template_server) -> None:
    """The random model writes no call, so the answer is content; the tools reached the prompt."""
    settings = dict(model=base_model(tool_template_server), messages=QUESTION, max_tokens=4, temperature=0)
    plain = client(tool_template_server).chat.completions.create(**settings)
    tools = [{"type": "function", "function": {"name": "now"}}]  # the tiny model's context is 256 tokens
    auto = client(tool_template_server).chat.completions.create(**settings, tools=tools)
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens + 20
    assert auto.choices[0].finish_reason == "length" and auto.choices[0].message.tool_calls is None


# Room for the longest Forecast the grammar allows a model sampling at temperature 1: twelve characters of city,
# each possibly a six-character escape (within the tiny model's 256-token context).
LONGEST = 180


class Forecast(BaseModel):
    """Extra fields forbidden (additionalProperties: false): a schema that allows them lets a model sampling at
    random add fields until max_tokens, as JSON Schema permits."""

    model_config = ConfigDict(extra="forbid")

    city: str = Field(max_length=12)
    days: int = Field(ge=1, le=7)


@pytest.fixture(scope="module", params=["embedded model", "tiny model with an adapter"])
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Server, str]:
    """A server and the model to name: the embedded base model, or an adapter uploaded onto the tiny model."""
    if request.param == "embedded model":
        server = request.getfixturevalue("server")
        return server, base_model(server)
    server, model_dir = request.getfixturevalue("adapter_server"), request.getfixturevalue("tiny_model_dir")
    directory = save_random_adapter(model_dir, tmp_path_factory.mktemp("frameworks") / "adapter", seed=42)
    assert upload(server.url, "frameworks", directory).status_code == 201
    return server, "frameworks"


def test_instructor_gets_a_validated_object(target) -> None:
    import instructor
    server, model = target
    patched = instructor.from_openai(client(server), mode=instructor.Mode.TOOLS)
    for seed in range(3):
        forecast = patched.chat.completions.create(model=model, messages=QUESTION, response_model=Forecast,
                                                   max_tokens=LONGEST, temperature=1.0, seed=seed, max_retries=0)
        assert isinstance(forecast, Forecast) and 1 <= forecast.days <= 7


def test_langchain_structured_output_and_a_required_tool_call(target) -> None:
    from langchain_openai import ChatOpenAI
    server, model_name = target
    model = ChatOpenAI(base_url=f"{server.url}/v1", api_key="unused", model=model_name, max_tokens=LONGEST,
                       temperature=1.0, max_retries=0)
    forecast = model.with_structured_output(Forecast, method="json_schema").invoke("Weather in Rome for 2 days?")
    assert isinstance(forecast, Forecast)
    message = model.bind_tools([Forecast], tool_choice="required").invoke("Weather in Rome for 2 days?")
    assert message.tool_calls and Forecast.model_validate(message.tool_calls[0]["args"])
