"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions and /v1/models (adapters included).

Each POST endpoint has a JSON and an SSE form; both take the same dependency, which validates the body and
submits its requests before either answers, and aborts what still runs once the HTTP request is over.
"""
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request

from loraserve.api.errors import InvalidRequestError
from loraserve.api.generation import (Generation, context_left, engine_of, new_request_id, pinned_until_submitted,
                                   select_adapter, submit, tokenize, tokenize_chat, unless_disconnected)
from loraserve.api.openai_format import (OpenAIJob, chat_logprobs, generated_logprobs, joined_logprobs,
                                         openai_chunks, vllm_prompt_logprobs)
from loraserve.api.openai_schemas import ChatCompletionRequest, CompletionRequest
from loraserve.api.openapi import OPENAI_GENERATION_ERRORS
from loraserve.api.streaming import add_stream_switch_route, sse_events
from loraserve.api.tool_calls import CallReader, read_message
from loraserve.engine.async_engine import AsyncEngine
from loraserve.engine.outputs import RequestOutput
from loraserve.model.tokenizer import Tokenizer

router = APIRouter()


async def submitted_completion(body: CompletionRequest,
                               engine: AsyncEngine = Depends(engine_of)) -> AsyncIterator[OpenAIJob]:
    """Every prompt n times, choice i of a prompt seeded with seed + i."""
    prompts = body.prompts()
    if not prompts:
        raise InvalidRequestError("the prompt is empty", "prompt")
    engine.check_capacity(len(prompts) * body.n)  # before tokenizing a batch that could never run
    token_ids = [await tokenize(engine, p) if isinstance(p, str) else p for p in prompts]
    params = [body.sampling_params(body.max_tokens, body.logprobs, i, body.prompt_scores)
              for _ in prompts for i in range(body.n)]
    request_id = new_request_id("cmpl")
    await engine.prepare_grammar(body.grammar_spec)
    adapter = await select_adapter(engine, body.model, "model")
    with submit(engine, [ids for ids in token_ids for _ in range(body.n)], params, request_id,
                adapter) as submission:
        # Decoded once submitted: the engine has checked that the token ids are few and in the vocabulary.
        echo_texts = [p if isinstance(p, str) else engine.tokenizer.decode(p) for p in prompts] if body.echo else []
        yield OpenAIJob(submission, request_id, body.model or engine.model_name, body.n, body.include_usage,
                        body.logprobs, echo_texts, token_ids if body.echoed_logprobs else [], body.prompt_logprobs)


async def submitted_chat(body: ChatCompletionRequest,
                         engine: AsyncEngine = Depends(engine_of)) -> AsyncIterator[OpenAIJob]:
    """The conversation (and its tools) through the model's chat template, answered n times."""
    if body.tool_mode == "auto" and engine.tokenizer.tool_call_format is None:
        raise InvalidRequestError("tool_choice 'auto' (the default with tools) needs a chat template that shows the "
                                  "model its tools and a call format this server reads (Hermes <tool_call> blocks); "
                                  "this model's has none: use tool_choice 'required' or name a function",
                                  "tool_choice")
    prompt = await tokenize_chat(engine, [message.as_template_input() for message in body.messages],
                                 body.template_tools())
    await engine.prepare_grammar(body.grammar_spec)
    adapter = await select_adapter(engine, body.model, "model")
    with pinned_until_submitted(engine, adapter):
        max_tokens = body.token_limit or context_left(engine, prompt, adapter)
        params = [body.sampling_params(max_tokens, body.logprobs_count, i, body.prompt_logprobs)
                  for i in range(body.n)]
    request_id = new_request_id("chatcmpl")
    with submit(engine, [prompt] * body.n, params, request_id, adapter) as submission:
        yield OpenAIJob(submission, request_id, body.model or engine.model_name, body.n, body.include_usage,
                        body.logprobs_count, prompt_logprobs=body.prompt_logprobs, tool_mode=body.tool_mode,
                        tool_function=body.tool_function)


def completion_choice(job: OpenAIJob, index: int, generation: Generation, tokenizer: Tokenizer) -> dict:
    echo = job.echo_text(index)
    logprobs = None
    if job.logprobs is not None:
        generated = generated_logprobs(generation.logprobs, job.logprobs, tokenizer, len(echo))
        logprobs = joined_logprobs(job.echoed_prompt_logprobs(index, generation.prompt_logprobs, tokenizer),
                                   generated)
    choice = {"index": index, "text": echo + generation.text, "logprobs": logprobs,
              "finish_reason": generation.finish_reason}
    if job.prompt_logprobs is not None:
        choice["prompt_logprobs"] = vllm_prompt_logprobs(generation.prompt_logprobs, job.prompt_logprobs, tokenizer)
    return choice


def chat_choice(job: OpenAIJob, index: int, generation: Generation, tokenizer: Tokenizer) -> dict:
    logprobs = None if job.logprobs is None else chat_logprobs(generation.logprobs, tokenizer)
    reader = job.call_reader()
    message = read_message(reader, generation.text)
    return {"index": index, "message": message, "logprobs": logprobs,
            "finish_reason": chat_finish_reason(reader, generation.finish_reason)}


def chat_finish_reason(reader: CallReader, finish_reason: str | None) -> str | None:
    """OpenAI's "tool_calls" for an answer that ended on its own after calling tools."""
    return "tool_calls" if reader.called and finish_reason == "stop" else finish_reason


ChoiceBuilder = Callable[[OpenAIJob, int, Generation, Tokenizer], dict]


async def answer(request: Request, job: OpenAIJob, object_name: str, choice_of: ChoiceBuilder) -> dict:
    """Wait for every choice (aborting if the client leaves first) and build the whole response."""
    generations = await unless_disconnected(request, job.submission.collect())
    tokenizer = engine_of(request).tokenizer
    choices = [choice_of(job, index, generation, tokenizer) for index, generation in enumerate(generations)]
    usage = job.usage(sum(len(g.token_ids) for g in generations), [g.num_cached_tokens for g in generations])
    body = job.envelope(object_name, choices, usage)
    if job.prompt_logprobs is not None and object_name == "chat.completion":  # vLLM's place for them in chat
        body["prompt_logprobs"] = vllm_prompt_logprobs(generations[0].prompt_logprobs, job.prompt_logprobs,
                                                       tokenizer)
    return body


async def create_completion(request: Request, job: OpenAIJob = Depends(submitted_completion)) -> dict:
    return await answer(request, job, "text_completion", completion_choice)


async def create_chat_completion(request: Request, job: OpenAIJob = Depends(submitted_chat)) -> dict:
    return await answer(request, job, "chat.completion", chat_choice)


async def stream_completion(request: Request,
                            job: OpenAIJob = Depends(submitted_completion)) -> AsyncIterator[bytes]:
    """Each choice's echoed prompt (when asked) with its first output, since its logprobs come with that output;
    then each output's text; the last one carries finish_reason."""
    tokenizer = engine_of(request).tokenizer
    text_lengths = [len(job.echo_text(index)) for index in range(len(job.submission.streams))]
    echoed: set[int] = set()

    def choices_of(index: int, output: RequestOutput) -> list[dict]:
        choices = []
        if job.echo_texts and index not in echoed:
            echoed.add(index)
            choices.append({"index": index, "text": job.echo_text(index), "finish_reason": None,
                            "logprobs": job.echoed_prompt_logprobs(index, output.prompt_logprobs, tokenizer)})
        logprobs = None if job.logprobs is None else generated_logprobs(output.logprobs, job.logprobs, tokenizer,
                                                                        text_lengths[index])
        text_lengths[index] += len(output.text)
        return choices + [{"index": index, "text": output.text, "logprobs": logprobs,
                           "finish_reason": output.finish_reason}]

    async for event in sse_events(openai_chunks(job, "text_completion", [], choices_of), openai=True):
        yield event


async def stream_chat_completion(request: Request,
                                 job: OpenAIJob = Depends(submitted_chat)) -> AsyncIterator[bytes]:
    """A role delta per choice, then content and tool-call deltas, then a chunk with each choice's
    finish_reason. A token's logprobs come with the first delta its text makes (or an empty content delta)."""
    tokenizer = engine_of(request).tokenizer
    readers = [job.call_reader() for _ in job.submission.streams]

    def choice(index: int, delta: dict, logprobs: dict | None = None, finish_reason: str | None = None) -> dict:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    def choices_of(index: int, output: RequestOutput) -> list[dict]:
        reader = readers[index]
        deltas = reader.feed(output.text) + (reader.finish() if output.finished else [])
        if not deltas and job.logprobs is not None and output.logprobs:
            deltas = [{"content": ""}]
        logprobs = None if job.logprobs is None else chat_logprobs(output.logprobs, tokenizer)
        choices = [choice(index, delta, logprobs if position == 0 else None) for position, delta in enumerate(deltas)]
        if output.finished:
            choices.append(choice(index, {}, finish_reason=chat_finish_reason(reader, output.finish_reason)))
        return choices

    opening = [choice(index, {"role": "assistant", "content": ""}) for index in range(len(job.submission.streams))]
    async for event in sse_events(openai_chunks(job, "chat.completion.chunk", opening, choices_of), openai=True):
        yield event


def model_object(engine: AsyncEngine, name: str, parent: str | None, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "loraserve", "root": name,
            "parent": parent, "max_model_len": engine.max_model_len}


@router.get("/v1/models")
async def list_models(engine: AsyncEngine = Depends(engine_of)) -> dict:
    """The base model, then each adapter as a model whose parent is the base."""
    adapters = [model_object(engine, record.name, engine.model_name, int(record.created_at))
                for record in engine.adapters.records()]
    return {"object": "list", "data": [model_object(engine, engine.model_name, None, 0), *adapters]}


add_stream_switch_route(router, "/v1/completions", create_completion, stream_completion, OPENAI_GENERATION_ERRORS)
add_stream_switch_route(router, "/v1/chat/completions", create_chat_completion, stream_chat_completion,
                        OPENAI_GENERATION_ERRORS)
