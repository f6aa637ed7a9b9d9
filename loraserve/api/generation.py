"""What both APIs do with the engine: submit the requests behind one HTTP request, gather or merge their
outputs, and abort whatever still runs once the HTTP request is over (finished, failed or abandoned)."""
import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request

from loraserve.adapters.errors import AdapterNotFoundError
from loraserve.adapters.records import AdapterRef
from loraserve.api.errors import ClientDisconnectedError, GenerationAbortedError, ModelNotFoundError
from loraserve.engine.async_engine import AsyncEngine, OutputQueue, RequestStream
from loraserve.engine.outputs import RequestOutput, TokenLogprob
from loraserve.engine.sampling_params import SamplingParams

T = TypeVar("T")
LOGPROB_FLOOR = -9999.0  # stands for -inf, which JSON cannot carry


def engine_of(request: Request) -> AsyncEngine:
    """FastAPI dependency: the engine this app serves."""
    return request.app.state.engine


async def select_adapter(engine: AsyncEngine, name: str | None, param: str, source: str | None = None
                         ) -> AdapterRef | None:
    """The latest version of the adapter a request names, pinned; hold it in `pinned_until_submitted` until it goes
    to `submit`, which drops this pin. Empty or the served model's name means the base model. A name is not read
    here: once the request is queued, the adapter loader reads and places the adapter, the one helper the step
    thread leaves a core to (reads in worker threads here, several at once, took that core from the steps: 64
    requests for 64 adapters on 2 cores ran 1.2x longer). A path with `source` "local", or an s3:// URL with "s3"
    (LoRAX's), names an adapter by location, which is copied in first, in a worker thread, the first time and
    whenever it changes."""
    if not name or name == engine.model_name:
        return None
    try:
        if source == "s3" or (source == "local" and name.startswith("/")):
            return await asyncio.to_thread(engine.adapter_locations.resolve, name)
        return engine.adapters.resolve(name)
    except AdapterNotFoundError as error:
        raise ModelNotFoundError(name, param) from error


@contextmanager
def pinned_until_submitted(engine: AsyncEngine, adapter: AdapterRef | None) -> Iterator[None]:
    """Drop `select_adapter`'s pin if preparing the request fails before `submit` takes it over."""
    try:
        yield
    except BaseException:
        if adapter is not None:
            engine.adapters.unpin(adapter)
        raise


def context_left(engine: AsyncEngine, prompt: list[int], adapter: AdapterRef | None) -> int:
    """The context the prompt leaves for output, after the (pinned) adapter's virtual tokens, if it puts any
    before the prompt: the default max_tokens of routes whose output may fill the context."""
    num_virtual_tokens = 0 if adapter is None else engine.adapters.info(adapter).num_virtual_tokens
    return max(1, engine.max_model_len - num_virtual_tokens - len(prompt))


async def tokenize(engine: AsyncEngine, text: str, add_special_tokens: bool = True, bounded: bool = True
                   ) -> list[int]:
    """A prompt's token ids, computed in a worker thread: a long text takes seconds, and the event loop must go
    on answering everyone else (/health included). `bounded` refuses a text far beyond the context early."""
    return await asyncio.to_thread(engine.tokenizer.encode, text, add_special_tokens,
                                   engine.max_model_len if bounded else None)


async def tokenize_chat(engine: AsyncEngine, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """The conversation (and the tools, if any) rendered through the chat template and tokenized, in a worker
    thread (see `tokenize`)."""
    def render() -> list[int]:
        text = engine.tokenizer.apply_chat_template(messages, tools=tools)
        return engine.tokenizer.encode(text, add_special_tokens=False, max_tokens=engine.max_model_len)
    return await asyncio.to_thread(render)


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def finite(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


@dataclass
class Generation:
    """Everything one engine request produced, gathered from its outputs."""

    num_prompt_tokens: int
    num_cached_tokens: int = 0  # of the prompt's, found in the prefix cache
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # when asked: each prompt token's, the first None

    def add(self, output: RequestOutput) -> None:
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        self.num_cached_tokens = output.num_cached_tokens
        self.token_ids += output.token_ids
        self.text += output.text
        self.logprobs += output.logprobs
        self.finish_reason = output.finish_reason
        self.stop_reason = output.stop_reason


class Submission:
    """The engine requests behind one HTTP request, all sending their outputs to one queue; leaving its `with`
    block aborts those still running."""

    def __init__(self, streams: list[RequestStream], outputs: OutputQueue) -> None:
        self.streams = streams
        self.queue = outputs

    def __enter__(self) -> "Submission":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.abort()

    def abort(self) -> None:
        for stream in self.streams:
            stream.abort()  # a no-op for finished requests

    @property
    def num_prompt_tokens(self) -> list[int]:
        return [stream.num_prompt_tokens for stream in self.streams]

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every request's outputs as they arrive, each with the index of its request; a failure is raised."""
        unfinished = len(self.streams)
        while unfinished:
            index, output = await self.queue.get()
            if isinstance(output, Exception):
                raise output
            if output.finish_reason == "abort":
                raise GenerationAbortedError("the engine aborted the request")
            unfinished -= output.finished
            yield index, output

    async def collect(self) -> list[Generation]:
        """Wait for every request to finish; return what each produced, in submission order."""
        generations = [Generation(count) for count in self.num_prompt_tokens]
        async with aclosing(self.outputs()) as outputs:
            async for index, output in outputs:
                generations[index].add(output)
        return generations


def submit(engine: AsyncEngine, prompts: list[list[int]], params: list[SamplingParams], request_id: str,
           adapter: AdapterRef | None) -> Submission:
    """Submit one engine request per prompt; if any is refused, abort those already in and re-raise.

    Each submitted request pins the adapter for itself, so the pin `select_adapter` took is dropped here.
    """
    submission = Submission([], asyncio.Queue())
    try:
        engine.check_capacity(len(prompts))
        for index, (prompt, request_params) in enumerate(zip(prompts, params, strict=True)):
            submission.streams.append(engine.submit(prompt, request_params, f"{request_id}-{index}", adapter,
                                                    submission.queue, index))
    except BaseException:
        submission.abort()
        raise
    finally:
        if adapter is not None:
            engine.adapters.unpin(adapter)
    return submission


async def wait_for_disconnect(request: Request) -> None:
    """Return once the client closes its connection (the body has been read, so nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, but cancel it and raise ClientDisconnectedError if the client leaves first."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        if work_task in done:
            return work_task.result()
        raise ClientDisconnectedError("the client closed the connection")
    finally:
        watch_task.cancel()
        work_task.cancel()  # a no-op once it is done
