"""The request fields that ask for structured output, in each API's spelling, turned into one `GrammarSpec`.

OpenAI: `response_format` (`text`, `json_object`, `json_schema`). vLLM: `guided_json`, `guided_regex`,
`guided_choice`, `guided_grammar`, and the newer `structured_outputs` object. LoRAX: `response_format` with
`type: json_object` and an optional `schema`. A request asks for one constraint at most.
"""
import json
from typing import Any, Literal

from pydantic import Field

from loraserve.api.common_schema import StrictSchema
from loraserve.engine.grammar import GrammarSpec

MAX_GUIDED_CHOICES = 1024


class JsonSchemaFormat(StrictSchema):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # schemas are always enforced


class ResponseFormat(StrictSchema):
    """OpenAI's `response_format`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def spec(self) -> GrammarSpec | None:
        if self.type == "json_schema":
            if self.json_schema is None:
                raise ValueError("response_format of type json_schema needs a json_schema object")
            return GrammarSpec("json_schema", json.dumps(self.json_schema.schema_))
        return GrammarSpec("json_object") if self.type == "json_object" else None


class StructuredOutputs(StrictSchema):
    """vLLM's `structured_outputs`: one of its fields."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1, max_length=MAX_GUIDED_CHOICES)
    grammar: str | None = None
    json_object: bool | None = None

    def specs(self) -> list[GrammarSpec]:
        return guided_specs(self.json_, self.regex, self.choice, self.grammar, bool(self.json_object))


class LoraxResponseFormat(StrictSchema):
    """LoRAX's `response_format`: JSON, matching `schema` when given."""

    type: Literal["json_object"]
    schema_: dict[str, Any] | None = Field(None, alias="schema")

    def spec(self) -> GrammarSpec:
        return GrammarSpec("json_object") if self.schema_ is None else GrammarSpec("json_schema",
                                                                                   json.dumps(self.schema_))


def guided_specs(schema: dict[str, Any] | str | None, regex: str | None, choice: list[str] | None,
                 grammar: str | None, json_object: bool = False) -> list[GrammarSpec]:
    """vLLM's guided fields as specs (a grammar in Lark, or in GBNF as xgrammar takes it)."""
    specs = []
    if schema is not None:
        specs.append(GrammarSpec("json_schema", schema if isinstance(schema, str) else json.dumps(schema)))
    if regex is not None:
        specs.append(GrammarSpec("regex", regex))
    if choice is not None:
        specs.append(GrammarSpec("choice", json.dumps(choice)))
    if grammar is not None:
        specs.append(GrammarSpec("lark", grammar))
    if json_object:
        specs.append(GrammarSpec("json_object"))
    return specs


def only_one(specs: list[GrammarSpec]) -> GrammarSpec | None:
    if len(specs) > 1:
        raise ValueError("ask for one kind of structured output (response_format, guided_*, structured_outputs or "
                         f"a forced tool call), not {len(specs)}")
    return specs[0] if specs else None
