"""Server-sent events for both APIs, and the route that answers one path with JSON or with a stream.

A stream endpoint is an async generator of SSE bytes answered by `EventStream`. It has committed to a 200 stream
before its body runs, so every refusal must happen earlier: in the dependencies, which parse, validate and submit
the request before either kind of endpoint is called.

Not FastAPI's own `EventSourceResponse` generator endpoints: their keep-alive task can still be sending when a
client leaves mid-stream, and each such disconnect then raises out of the app as an error (fastapi discussion
#15725). Here the keep-alive lives in the one generator the response drains, so a leaving client only closes it.
"""
import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from fastapi.sse import format_sse_event
from starlette.responses import Response, StreamingResponse

from loraserve.api.errors import error_body
from loraserve.api.openapi import JSON_OR_STREAM
from loraserve.engine.errors import ShuttingDownError

logger = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 15.0  # an idle stream (a long queue or prefill) sends a comment so proxies keep it open
KEEPALIVE = b": ping\n\n"


class EventStream(StreamingResponse):
    """Server-sent events, never cached or buffered by a proxy on the way.

    The media type is set per response, not on the class: FastAPI would document a class-level one as a single
    string body beside the per-event schema each stream route declares (`openapi.STREAM`)."""

    def __init__(self, content: AsyncIterator[bytes], status_code: int = 200, **kwargs: Any) -> None:
        # FastAPI reads the default status code from this signature.
        super().__init__(content, status_code, media_type="text/event-stream", **kwargs)
        self.headers["Cache-Control"] = "no-cache"
        self.headers["X-Accel-Buffering"] = "no"  # nginx


class StreamSwitchRoute(APIRoute):
    """A route whose JSON body's `"stream": true` hands the request to an SSE twin of its endpoint."""

    def __init__(self, path: str, endpoint: Callable[..., Any], *, stream_endpoint: Callable[..., Any],
                 **kwargs: Any) -> None:
        self.stream_route = APIRoute(path, stream_endpoint, response_class=EventStream, **kwargs)
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Any]:
        answer_json = super().get_route_handler()
        answer_stream = self.stream_route.get_route_handler()

        async def handler(request: Request) -> Response:
            return await (answer_stream if await asks_for_stream(request) else answer_json)(request)

        return handler


async def asks_for_stream(request: Request) -> bool:
    """Peek at the body, parsed in a worker thread (a large batch takes a while to parse, and the event loop must
    go on serving) and left in Starlette's cache for the real handler; a malformed one goes the JSON way."""
    try:
        request._json = await asyncio.to_thread(json.loads, await request.body())  # Request.json's own cache
    except ValueError:
        return False
    return isinstance(request._json, dict) and request._json.get("stream") is True


def add_stream_switch_route(router: APIRouter, path: str, endpoint: Callable[..., Any],
                            stream_endpoint: Callable[..., Any], errors: dict[int | str, dict[str, Any]]) -> None:
    """The route documents both answers to a success and the `errors` it answers."""
    router.routes.append(StreamSwitchRoute(path, endpoint, stream_endpoint=stream_endpoint, methods=["POST"],
                                           responses={**JSON_OR_STREAM, **errors}))


async def sse_events(chunks: AsyncIterator[dict], openai: bool) -> AsyncIterator[bytes]:
    """Each chunk as one event, with keep-alive comments while none comes; a failure mid-stream becomes a final
    error event.

    OpenAI streams end with `data: [DONE]`; LoRAX streams must not, since its client parses every event as JSON.
    """
    try:
        async for chunk in with_keepalive(chunks):
            yield KEEPALIVE if chunk is None else event(json.dumps(chunk))
    except Exception as error:
        if not isinstance(error, ShuttingDownError):  # an expected end, not a fault to investigate
            logger.exception("a stream failed after it started")
        yield event(json.dumps(error_body(error, openai)))
    if openai:
        yield event("[DONE]")


def event(data: str) -> bytes:
    return format_sse_event(data_str=data)


async def with_keepalive(chunks: AsyncIterator[dict]) -> AsyncIterator[dict | None]:
    """`chunks`, with None each time KEEPALIVE_SECONDS pass without one. The next chunk is awaited in a task so that
    waiting can time out without cancelling it; whoever closes this generator (a client that left) cancels that
    task and closes `chunks` before going on, so nothing is left running or raising behind the closed stream."""
    pending: asyncio.Task | None = None
    async with aclosing(chunks):
        try:
            while True:
                pending = pending or asyncio.ensure_future(anext(chunks))
                done, _ = await asyncio.wait((pending,), timeout=KEEPALIVE_SECONDS)
                if not done:
                    yield None
                    continue
                finished, pending = pending, None
                try:
                    chunk = finished.result()
                except StopAsyncIteration:
                    return
                yield chunk
        finally:
            if pending is not None:
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)  # its end, whatever it is, is retrieved
