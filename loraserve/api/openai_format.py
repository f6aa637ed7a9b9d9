"""The JSON objects of OpenAI's completion and chat APIs, built from what the engine produced."""
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from itertools import accumulate

from loraserve.api.generation import Submission, finite
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
    created: int = field(default_factory=lambda: int(time.time()))

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


def completion_logprobs(logprobs: list[TokenLogprob], tokenizer: Tokenizer, text_offset: int) -> dict:
    """The legacy completions shape: parallel lists, alternatives as a token -> logprob map."""
    tokens = [tokenizer.token_text(entry.token_id) for entry in logprobs]
    return {
        "tokens": tokens,
        "token_logprobs": [finite(entry.logprob) for entry in logprobs],
        "top_logprobs": [{tokenizer.token_text(token_id): finite(value) for token_id, value in entry.top}
                         for entry in logprobs],
        "text_offset": list(accumulate((len(token) for token in tokens), initial=text_offset))[:-1],
    }


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
