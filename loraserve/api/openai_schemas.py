"""Request bodies of the OpenAI-compatible endpoints; ranges are checked here so the engine sees sane values.

Responses are plain dicts built in `openai_format.py`.
"""
from functools import cached_property
from typing import Any, ClassVar, Literal, TypeVar

from typing import Annotated

from pydantic import Field, field_validator, model_validator

from loraserve.api.common_schema import (MAX_CHOICES, MAX_INT32, MAX_INT64, MAX_LOGPROBS, MAX_STOP_SEQUENCES, MIN_INT64,
                                      RequestSchema, StopString, StopStrings, StrictSchema, TokenId, stop_list)
from loraserve.api.structured_schema import (MAX_GUIDED_CHOICES, ResponseFormat, StructuredOutputs, guided_specs,
                                              only_one)
from loraserve.api.tool_schema import MAX_TOOLS, MessageToolCall, ToolFields
from loraserve.engine.grammar import GrammarSpec
from loraserve.engine.sampling_params import SamplingParams

T = TypeVar("T")
# A list stops at its first bad item: a union tries each form of `prompt`, and a million token ids checked as
# strings would otherwise make a million errors, on the event loop.
FailFast = Annotated[T, Field(fail_fast=True)]


class StreamOptions(StrictSchema):
    include_usage: bool = False


class SamplingRequest(RequestSchema):
    """What both OpenAI endpoints accept besides the prompt; vLLM's extras (top_k, min_p, ...) included."""

    unsupported: ClassVar[dict[str, tuple]] = {
        "logit_bias": (None, {}), "suffix": (None, ""), "best_of": (None, 1), "tools": (None, []),
        "functions": (None, [])}

    model: str | None = None
    user: str | None = None  # OpenAI's end-user id, for the caller's own tracking: it changes no output
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, le=MAX_INT32)  # 0 or -1 (vLLM's spelling): off
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    seed: int | None = Field(None, ge=MIN_INT64, le=MAX_INT64)
    stop: StopString | StopStrings = []
    stop_token_ids: list[TokenId] = Field([], max_length=MAX_STOP_SEQUENCES)
    ignore_eos: bool = False
    speculative: bool = True  # false: no speculative decoding for this request
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # vLLM's: each prompt token's logprob
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None  # vLLM's structured output fields
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1, max_length=MAX_GUIDED_CHOICES)
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="after")
    def one_structured_output(self) -> "SamplingRequest":
        self.grammar_spec  # noqa: B018 - computed (and checked) once, here
        return self

    @cached_property
    def grammar_spec(self) -> GrammarSpec | None:
        """What the output must match, if the request asks for structured output in any of its spellings."""
        return only_one(self.structured_specs())

    def structured_specs(self) -> list[GrammarSpec]:
        """Every constraint the request's fields ask for (a valid request asks for one at most)."""
        specs = guided_specs(self.guided_json, self.guided_regex, self.guided_choice, self.guided_grammar)
        specs += self.structured_outputs.specs() if self.structured_outputs is not None else []
        response = self.response_format.spec() if self.response_format is not None else None
        return specs + ([response] if response is not None else [])

    @model_validator(mode="after")
    def prompt_logprobs_are_not_streamed(self) -> "SamplingRequest":
        """As in vLLM: prompt logprobs come in a whole answer, not in a stream."""
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs are not available with stream: true")
        return self

    @field_validator("stop")
    @classmethod
    def check_stop(cls, stop: str | list[str]) -> list[str]:
        return stop_list(stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_tokens: int, logprobs: int | None, index: int,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """The engine's settings for the `index`-th choice; a seeded request gives choice i the seed + i."""
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_k=max(self.top_k, 0), top_p=self.top_p,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=None if self.seed is None else self.seed + index,
            stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, speculative=self.speculative, grammar=self.grammar_spec)


class CompletionRequest(SamplingRequest):
    """POST /v1/completions: the prompt is text, token ids, or a batch of either."""

    prompt: str | FailFast[list[str]] | FailFast[list[TokenId]] | FailFast[list[FailFast[list[TokenId]]]]
    max_tokens: int = Field(16, ge=0, le=MAX_INT32)  # 0: score (or echo) the prompt, generate nothing
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @model_validator(mode="after")
    def nothing_to_generate_needs_echo(self) -> "CompletionRequest":
        if self.max_tokens == 0 and not self.echo and self.prompt_logprobs is None:
            raise ValueError("max_tokens 0 generates nothing: it needs echo (or prompt_logprobs) to answer anything")
        return self

    @property
    def echoed_logprobs(self) -> bool:
        """OpenAI's echo with logprobs: the answer's logprobs start with the prompt's tokens (the first null)."""
        return self.echo and self.logprobs is not None

    @property
    def prompt_scores(self) -> int | None:
        """Alternatives per prompt token the engine must report (None: no prompt scores), for both echo's
        logprobs and vLLM's prompt_logprobs."""
        wanted = [count for count in (self.logprobs if self.echo else None, self.prompt_logprobs) if count is not None]
        return max(wanted) if wanted else None

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts, each as text or token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


class TextPart(StrictSchema):
    type: Literal["text"]
    text: str


class ChatMessage(StrictSchema):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[MessageToolCall] | None = Field(None, max_length=MAX_TOOLS)  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    @model_validator(mode="after")
    def tool_fields_fit_the_role(self) -> "ChatMessage":
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls, not {self.role} messages")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise ValueError("a tool message needs the tool_call_id it answers, and only a tool message has one")
        self.template_tool_calls  # noqa: B018 - the arguments are checked here, once
        return self

    @cached_property
    def template_tool_calls(self) -> list[dict[str, Any]] | None:
        return None if self.tool_calls is None else [call.as_template_input() for call in self.tool_calls]

    def as_template_input(self) -> dict[str, Any]:
        """The role, the plain text (text parts joined) and any tool fields, as chat templates take them."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        message: dict[str, Any] = {"role": self.role, "content": content}
        if self.tool_calls is not None:
            message["tool_calls"] = self.template_tool_calls
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(SamplingRequest, ToolFields):
    """POST /v1/chat/completions: without a token limit, the answer may fill the rest of the context. Tools are
    served here (see tool_schema.py)."""

    unsupported: ClassVar[dict[str, tuple]] = {
        name: neutral for name, neutral in SamplingRequest.unsupported.items() if name != "tools"}

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def top_logprobs_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    def structured_specs(self) -> list[GrammarSpec]:
        self.check_tools()
        specs, tool_spec = super().structured_specs(), self.tool_grammar_spec()
        if tool_spec is None or (self.tool_mode == "auto" and specs):
            return specs  # under auto, a response_format leaves no room for calls: it alone holds the answer
        return specs + [tool_spec]

    @property
    def tool_function(self) -> str | None:
        """The function a named tool_choice forces."""
        return self.tool_choice.function.name if self.tool_mode == "named" else None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprobs_count(self) -> int | None:
        """How many alternatives the engine reports per token; None asks for no logprobs at all."""
        return (self.top_logprobs or 0) if self.logprobs else None
