"""OpenAI's tool calling as requests spell it: the functions a chat request declares (`tools`), how the model may
call them (`tool_choice`, `parallel_tool_calls`), the calls and results earlier turns carry, and the grammar that
forces a call when one is required.

`required` and a named function are enforced: the model must write the call, its arguments valid against the
function's schema (a named function's arguments alone; under `required`, a JSON array of {"name", "parameters"}
objects, one or more, or exactly one without parallel calls). `auto` leaves the model's text free, but once it opens
a Hermes `<tool_call>` block the call is held to a declared function and its schema (llguidance's structural tags:
a lazy trigger, then the grammar); it needs a chat template that shows the model the tools in that format.
"""
import json
from typing import Any, Literal

from llguidance import StructTag
from pydantic import Field

from loraserve.api.common_schema import StrictSchema
from loraserve.engine.grammar import GrammarSpec

MAX_TOOLS = 128
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"  # the blocks Hermes-style templates teach
FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function names
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def hermes_opening(name: str) -> str:
    """A Hermes call up to its arguments, as Qwen's and Hermes' templates show it."""
    return f'{HERMES_OPEN}\n{{"name": {json.dumps(name)}, "arguments": '


class FunctionDefinition(StrictSchema):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; omitted: the function takes no arguments
    strict: bool | None = None

    @property
    def parameters_schema(self) -> dict[str, Any]:
        return NO_PARAMETERS if self.parameters is None else self.parameters


class Tool(StrictSchema):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(StrictSchema):
    name: str


class NamedToolChoice(StrictSchema):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice
ToolMode = Literal["none", "auto", "required", "named"]


class CalledFunction(StrictSchema):
    name: str
    arguments: str  # JSON text, as OpenAI returns it


class MessageToolCall(StrictSchema):
    """A call an earlier assistant turn made, sent back with the conversation."""

    id: str
    type: Literal["function"]
    function: CalledFunction

    def as_template_input(self) -> dict[str, Any]:
        """Templates expect the arguments as an object (they write them out with `tojson`)."""
        try:
            arguments = json.loads(self.function.arguments)
        except json.JSONDecodeError as error:
            raise ValueError(f"the arguments of tool call {self.id!r} are not JSON: {error}") from None
        return {"id": self.id, "type": "function", "function": {"name": self.function.name, "arguments": arguments}}


class ToolFields(StrictSchema):
    """The tool fields of a chat request (a base of its schema), checked together."""

    tools: list[Tool] = Field([], max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True

    @property
    def tool_mode(self) -> ToolMode:
        """What the model may or must do: the default is `auto` with tools and `none` without."""
        choice = self.tool_choice if self.tool_choice is not None else "auto" if self.tools else "none"
        return "named" if isinstance(choice, NamedToolChoice) else choice

    def check_tools(self) -> None:
        names = [tool.function.name for tool in self.tools]
        if len(set(names)) != len(names):
            raise ValueError("tools: each function needs a name of its own")
        if self.tool_mode != "none" and not self.tools:
            raise ValueError(f"tool_choice {self.tool_mode!r} needs tools")
        if self.tool_mode == "named" and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names the function {self.tool_choice.function.name!r}, which is not "
                             f"among the tools")

    def tool_grammar_spec(self) -> GrammarSpec | None:
        """The grammar of the calls: a forced call (`required` or a named function), or under `auto` free text
        whose Hermes blocks hold valid calls; None without tools."""
        if self.tool_mode == "auto":
            tags = [StructTag(trigger=HERMES_OPEN, begin=hermes_opening(tool.function.name),
                              grammar=tool.function.parameters_schema, end="}\n" + HERMES_CLOSE)
                    for tool in self.tools]
            return GrammarSpec("lark", StructTag.to_grammar(tags, assume_special=False))
        if self.tool_mode == "named":
            wanted = self.tool_choice.function.name
            function = next(tool.function for tool in self.tools if tool.function.name == wanted)
            return GrammarSpec("json_schema", json.dumps(function.parameters_schema))
        if self.tool_mode != "required":
            return None
        calls = [{"type": "object", "properties": {"name": {"const": tool.function.name},
                                                   "parameters": tool.function.parameters_schema},
                  "required": ["name", "parameters"], "additionalProperties": False} for tool in self.tools]
        schema = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
        return GrammarSpec("json_schema", json.dumps(schema | ({} if self.parallel_tool_calls else {"maxItems": 1})))

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as chat templates take them (Hugging Face's convention: OpenAI's objects), or None."""
        return [tool.model_dump(exclude_none=True) for tool in self.tools] or None
