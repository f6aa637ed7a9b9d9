"""LoRAX-compatible endpoints: POST /generate, /generate_stream, and / (which `lorax-client` calls).

`/` answers a JSON list, or a stream when the body says `"stream": true`. LoRAX streams send one event per
token, the last one with the whole text and the details, and no `[DONE]` marker.
"""
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request

from loraserve.api.generation import (Generation, Submission, context_left, engine_of, finite, new_request_id,
                                   pinned_until_submitted, select_adapter, submit, tokenize, unless_disconnected)
from loraserve.api.lorax_schemas import GenerateParameters, GenerateRequest
from loraserve.api.openapi import LORAX_GENERATION_ERRORS, STREAM
from loraserve.api.streaming import EventStream, add_stream_switch_route, sse_events
from loraserve.engine.async_engine import AsyncEngine
from loraserve.engine.outputs import TokenLogprob
from loraserve.model.tokenizer import Tokenizer

router = APIRouter()


@dataclass
class LoraxJob:
    """A submitted LoRAX request and what its answer needs besides the engine's outputs."""

    submission: Submission
    parameters: GenerateParameters
    inputs: str
    prompt_token_ids: list[int]
    tokenizer: Tokenizer

    def token(self, entry: TokenLogprob) -> dict:
        tokenizer = self.tokenizer
        alternatives = [{"id": token_id, "text": tokenizer.token_text(token_id), "logprob": finite(value)}
                        for token_id, value in entry.top]
        return {"id": entry.token_id, "text": tokenizer.token_text(entry.token_id), "logprob": finite(entry.logprob),
                "special": tokenizer.is_special(entry.token_id),
                "alternative_tokens": alternatives if self.parameters.return_k_alternatives else None}

    def generated_text(self, generation: Generation) -> str:
        return (self.inputs if self.parameters.return_full_text else "") + generation.text

    def stream_details(self, generation: Generation) -> dict:
        """The details a stream's last event carries; a full answer adds the tokens to them."""
        reason = generation.finish_reason
        if reason == "stop":
            reason = "stop_sequence" if isinstance(generation.stop_reason, str) else "eos_token"
        return {"finish_reason": reason, "prompt_tokens": len(self.prompt_token_ids),
                "generated_tokens": len(generation.token_ids),
                "seed": self.parameters.seed if self.parameters.sampling else None}

    def details(self, generation: Generation) -> dict:
        """With decoder_input_details, each prompt token and its logprob (null for the first, as in LoRAX)."""
        prefill = []
        if self.parameters.decoder_input_details:
            prefill = [{"id": token_id, "text": self.tokenizer.token_text(token_id),
                        "logprob": None if score is None else finite(score.logprob)}
                       for token_id, score in zip(self.prompt_token_ids, generation.prompt_logprobs, strict=True)]
        return self.stream_details(generation) | {
            "prefill": prefill, "tokens": [self.token(entry) for entry in generation.logprobs],
            "best_of_sequences": None}

    def response(self, generation: Generation) -> dict:
        body = {"generated_text": self.generated_text(generation)}
        if self.parameters.details:
            body["details"] = self.details(generation)
        return body


async def submitted_generate(body: GenerateRequest,
                             engine: AsyncEngine = Depends(engine_of)) -> AsyncIterator[LoraxJob]:
    """Without max_new_tokens, the answer may fill the rest of the context, as in LoRAX."""
    parameters = body.parameters
    prompt = await tokenize(engine, body.inputs, bounded=not parameters.truncate)  # truncating takes any length
    if parameters.truncate:
        prompt = prompt[-parameters.truncate:]
    await engine.prepare_grammar(parameters.grammar_spec)
    adapter = await select_adapter(engine, parameters.adapter_id, "adapter_id", parameters.adapter_source)
    with pinned_until_submitted(engine, adapter):
        request_params = [parameters.sampling_params(parameters.max_new_tokens
                                                     or context_left(engine, prompt, adapter))]
    with submit(engine, [prompt], request_params, new_request_id("generate"), adapter) as submission:
        yield LoraxJob(submission, parameters, body.inputs, prompt, engine.tokenizer)


async def generate_once(request: Request, job: LoraxJob) -> dict:
    generations = await unless_disconnected(request, job.submission.collect())
    return job.response(generations[0])


async def token_events(job: LoraxJob) -> AsyncIterator[dict]:
    """One event per generated token; the last also carries the whole text and the details."""
    generation = Generation(len(job.prompt_token_ids))
    async with aclosing(job.submission.outputs()) as outputs:
        async for _, output in outputs:
            generation.add(output)
            events = [{"token": job.token(entry), "generated_text": None, "details": None}
                      for entry in output.logprobs]
            if output.finished:
                events[-1] |= {"generated_text": job.generated_text(generation),
                               "details": job.stream_details(generation)}
            for event in events:
                yield event


@router.post("/generate", responses=LORAX_GENERATION_ERRORS)
async def generate(request: Request, job: LoraxJob = Depends(submitted_generate)) -> dict:
    return await generate_once(request, job)


@router.post("/generate_stream", response_class=EventStream,
             responses={200: {"content": STREAM}, **LORAX_GENERATION_ERRORS})
async def generate_stream(job: LoraxJob = Depends(submitted_generate)) -> AsyncIterator[bytes]:
    async for event in sse_events(token_events(job), openai=False):
        yield event


async def generate_compat(request: Request, job: LoraxJob = Depends(submitted_generate)) -> list[dict]:
    """`/` answers a list, the shape lorax-client reads."""
    return [await generate_once(request, job)]


add_stream_switch_route(router, "/", generate_compat, generate_stream, LORAX_GENERATION_ERRORS)
