"""The JSON objects of OpenAI's completion and chat APIs, built from what the engine produced."""
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from itertools import accumulate

from loraserve.api.generation import Submission, finite
from loraserve.api.tool_calls import CallReader, reader_for
from loraserve.api.tool_schema import ToolMode
from loraserve.engine.outputs import RequestOutput, TokenLogprob
from loraserve.model.tokenizer import Tokenizer

@dataclass
class OpenAIJob:
    """A submitted OpenAI request and what its answer needs besides the engine's outputs."""

    submission: Submission
    request_id: str
    model: str
    num_choices_per_prompt: int
    include_usage: bool
    logprobs: int | None
    echo_texts: list[str] = field(default_factory=list)  # completions with echo: each prompt's text
    # Completions whose logprobs start with the prompt's (echo with logprobs): each prompt's token ids.
    echoed_token_ids: list[list[int]] = field(default_factory=list)
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs: alternatives per prompt token
    tool_mode: ToolMode = "none"  # chat: how the answer's text is read for tool calls
    tool_function: str | None = None  # the function a named tool_choice forces
    created: int = field(default_factory=lambda: int(time.time()))

    def call_reader(self) -> CallReader:
        """A fresh reader of one choice's text: content, and tool calls when the request has tools."""
        return reader_for(self.tool_mode, self.tool_function)

    def envelope(self, object_name: str, choices: list[dict], usage: dict | None = None) -> dict:
        body = {"id": self.request_id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    def usage(self, completion_tokens: int, cached_tokens: list[int]) -> dict:
        """Token counts; a prompt asked for n choices still counts once (with its first choice's cache hits)."""
        prompt_tokens = sum(self.submission.num_prompt_tokens[::self.num_choices_per_prompt])
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": sum(cached_tokens[::self.num_choices_per_prompt])}}

    def echo_text(self, choice_index: int) -> str:
        return self.echo_texts[choice_index // self.num_choices_per_prompt] if self.echo_texts else ""

    def echoed_prompt_logprobs(self, choice_index: int, scores: list[TokenLogprob | None] | None, tokenizer: Tokenizer
                        ) -> dict | None:
        """The prompt's part of an echoed answer's logprobs (None unless echo with logprobs was asked)."""
        if not self.echoed_token_ids:
            return None
        token_ids = self.echoed_token_ids[choice_index // self.num_choices_per_prompt]
        return completion_logprobs(token_ids, scores or [], self.logprobs or 0, tokenizer, 0)


def completion_logprobs(token_ids: list[int], entries: list[TokenLogprob | None], count: int, tokenizer: Tokenizer,
                        text_offset: int) -> dict:
    """The legacy completions shape: parallel lists, alternatives as a token -> logprob map, null where a token
    has no score (a prompt's first token). Offsets index the answer's text, where special tokens take no room."""
    tokens = [tokenizer.token_text(token_id) for token_id in token_ids]
    lengths = [0 if tokenizer.is_special(token_id) else len(token) for token_id, token in zip(token_ids, tokens)]
    return {
        "tokens": tokens,
        "token_logprobs": [None if entry is None else finite(entry.logprob) for entry in entries],
        "top_logprobs": [None if entry is None else
                         {tokenizer.token_text(token_id): finite(value) for token_id, value in entry.top[:count]}
                         for entry in entries],
        "text_offset": list(accumulate(lengths, initial=text_offset))[:-1],
    }


def generated_logprobs(entries: list[TokenLogprob], count: int, tokenizer: Tokenizer, text_offset: int) -> dict:
    """The completion's own tokens in the legacy shape, from `text_offset` on."""
    return completion_logprobs([entry.token_id for entry in entries], entries, count, tokenizer, text_offset)


def joined_logprobs(first: dict | None, second: dict) -> dict:
    """Two stretches of completion logprobs as one (an echoed prompt's, then the completion's)."""
    return second if first is None else {key: first[key] + second[key] for key in second}


def vllm_prompt_logprobs(scores: list[TokenLogprob | None], count: int, tokenizer: Tokenizer) -> list[dict | None]:
    """vLLM's shape: per prompt token, null for the first, else a map from token id to its logprob, rank and text,
    holding the prompt token and the `count` most likely."""
    def entry(logprob: float, rank: int, token_id: int) -> dict:
        return {"logprob": finite(logprob), "rank": rank, "decoded_token": tokenizer.token_text(token_id)}
    return [None if score is None else
            {score.token_id: entry(score.logprob, score.rank, score.token_id)}
            | {token_id: entry(value, rank, token_id) for rank, (token_id, value) in enumerate(score.top[:count], 1)
               if token_id != score.token_id}
            for score in scores]


def chat_token(token_id: int, logprob: float, tokenizer: Tokenizer) -> dict:
    text = tokenizer.token_text(token_id)
    return {"token": text, "logprob": finite(logprob), "bytes": list(text.encode())}


def chat_logprobs(logprobs: list[TokenLogprob], tokenizer: Tokenizer) -> dict:
    """The chat shape: one entry per token, each with its own alternatives."""
    return {"content": [chat_token(entry.token_id, entry.logprob, tokenizer)
                        | {"top_logprobs": [chat_token(token_id, value, tokenizer) for token_id, value in entry.top]}
                        for entry in logprobs]}


async def openai_chunks(job: OpenAIJob, object_name: str, opening: list[dict],
                        choices_of: Callable[[int, RequestOutput], list[dict]]) -> AsyncIterator[dict]:
    """An OpenAI stream: the opening choices, then the choices each output makes, then usage if asked for."""
    for choice in opening:
        yield job.envelope(object_name, [choice])
    output_tokens = [0] * len(job.submission.streams)
    cached_tokens = [0] * len(job.submission.streams)
    async with aclosing(job.submission.outputs()) as outputs:
        async for index, output in outputs:
            output_tokens[index] = output.num_output_tokens
            cached_tokens[index] = output.num_cached_tokens
            for choice in choices_of(index, output):
                yield job.envelope(object_name, [choice])
    if job.include_usage:
        yield job.envelope(object_name, [], job.usage(sum(output_tokens), cached_tokens))
